"""Inputs shared by the official-code fixtures and the tests that compare dinoflow with them.

``experiments/faithful/make_fixtures.py`` feeds these inputs to a local copy of
facebookresearch/dinov2 and writes its outputs under ``tests/fixtures/dinov2_reference/``;
``tests/unit/test_faithful_reference.py`` feeds the same inputs to dinoflow (the dinoflow-side
helpers at the end of this module are shared by those tests and ``compare.py``). Everything here is
regenerated from seeds (numpy's PCG64), so the fixtures hold only the reference's outputs.

Shared random stream: the reference draws from python's ``random`` (``uniform``, ``randint``,
``shuffle``), dinoflow from a numpy Generator (``random``, ``integers``, ``permutation``). Both
sides are driven by one recorded sequence u_0, u_1, ... of uniforms in [0, 1) with one mapping
per kind of draw, the same on both sides:
  uniform(a, b)  = a + (b - a) * u   (python's own formula)  <->  random() = u
  randint(a, b)  = a + floor(u * (b - a + 1))                 <->  integers(a, b + 1)
  shuffle(x)     = python's Fisher-Yates, j = floor(u * (i + 1)) <-> permutation(len(x))
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dinoflow.masking import BlockMaskGenerator, sample_masks

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "dinov2_reference"


def uniform_stream(seed: int, n: int) -> np.ndarray:
    """(n,) float64 uniforms in [0, 1): the shared stream."""
    return np.random.default_rng(seed).random(n)


class _Stream:
    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.used = 0

    def _next(self) -> float:
        if self.used >= len(self.values):
            raise RuntimeError(f"shared stream exhausted after {self.used} draws")
        u = float(self.values[self.used])
        self.used += 1
        return u

    def _below(self, n: int) -> int:
        return min(int(math.floor(self._next() * n)), n - 1)

    def _fisher_yates(self, n: int) -> list[int]:
        order = list(range(n))
        for i in reversed(range(1, n)):  # the loop of CPython's random.shuffle
            j = self._below(i + 1)
            order[i], order[j] = order[j], order[i]
        return order


class StreamRandom(_Stream):
    """Stands in for the ``random`` module inside the reference's masking and collate code."""

    def random(self) -> float:
        return self._next()

    def uniform(self, a, b):
        return a + (b - a) * self._next()

    def randint(self, a: int, b: int) -> int:
        return a + self._below(b - a + 1)

    def shuffle(self, x: list) -> None:
        x[:] = [x[i] for i in self._fisher_yates(len(x))]


class StreamRng(_Stream):
    """Stands in for the numpy Generator that dinoflow's masking draws from."""

    def random(self) -> float:
        return self._next()

    def integers(self, low: int, high: int) -> int:
        return low + self._below(high - low)

    def permutation(self, n: int) -> np.ndarray:
        return np.array(self._fisher_yates(n))


def random_official_state_dict(layout: list[tuple[str, list[int]]], seed: int) -> dict:
    """Random float32 weights (numpy arrays) for an official-layout ViT, in ``layout`` order.

    Scales keep a 12-block network's activations in a normal range: Linear/conv weights
    N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm weights 1 + N(0, 0.1^2), LayerScale gammas
    U(0.05, 0.5), CLS/register/mask tokens and the position embeddings N(0, 0.5^2).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in layout:
        z = rng.standard_normal(tuple(shape), dtype=np.float32)
        leaf = key.rsplit(".", 1)[-1]
        if key in ("cls_token", "register_tokens", "mask_token", "pos_embed"):
            v = 0.5 * z
        elif leaf == "gamma":
            v = rng.uniform(0.05, 0.5, size=tuple(shape)).astype(np.float32)
        elif "norm" in key and leaf == "weight":
            v = 1.0 + 0.1 * z
        elif leaf == "bias":
            v = 0.1 * z
        else:
            v = z / np.float32(math.sqrt(int(np.prod(shape[1:]))))
        out[key] = v.astype(np.float32)
    return out


def random_images(seed: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """One (1, 3, H, W) float32 N(0, 1) image per size."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, h, w), dtype=np.float32) for h, w in sizes]


def token_positions(n_patches: int, k: int = 8) -> np.ndarray:
    """k patch indices spread over 0..n_patches - 1 (first and last included)."""
    return np.unique(np.linspace(0, n_patches - 1, k).round().astype(int))


def random_pos_embed(seed: int, grid: int, dim: int) -> np.ndarray:
    """(1, 1 + grid^2, dim) float32 official-layout position embeddings (CLS row first)."""
    return np.random.default_rng(seed).standard_normal((1, 1 + grid * grid, dim), dtype=np.float32)


# ----------------------------------------------------------------------------- dinoflow's side
# Each function runs dinoflow on a fixture's inputs and returns max abs differences from the
# official outputs (used by tests/unit/test_faithful_reference.py and experiments/faithful/compare.py).
def load_fixture(name: str) -> dict:
    """``meta`` (the json) or the arrays of ``<name>.npz``."""
    import json

    if name == "meta":
        return json.loads((FIXTURES / "meta.json").read_text())
    with np.load(FIXTURES / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def official_weights(model: str, meta: dict) -> dict:
    """The regenerated official-layout weights (torch tensors) of fixture model ``model``."""
    import hashlib

    import torch

    info = meta["vit"][model]
    weights = random_official_state_dict([(k, s) for k, s in info["layout"]],
                                         meta["seeds"]["vit_weights"])
    digest = hashlib.sha256()
    for v in weights.values():
        digest.update(np.ascontiguousarray(v).tobytes())
    if digest.hexdigest() != info["weights_sha256"]:
        raise AssertionError(f"{model}: regenerated weights differ from the fixture's "
                             "(numpy's random stream changed?)")
    return {k: torch.from_numpy(v) for k, v in weights.items()}


def vit_differences(model: str, tmp_dir: Path, img_size: int | None = None,
                    sizes: list[str] | None = None, **overrides) -> dict[str, dict[str, float]]:
    """Max abs differences {"HxW": {"cls", "registers", "patches", "patch_mean"}} between
    dinoflow and the official forward of fixture ``model``, its weights loaded from an
    official-layout file into a dinoflow ViT-S/14 whose stored grid is ``img_size`` px (the
    file's own by default: no resize) and whose kwargs take ``overrides`` (e.g. the
    interpolation). ``sizes``: only these "HxW" of the fixture (default: all)."""
    import torch

    from dinoflow.models.vit import DinoVisionTransformer
    from dinoflow.weights import load_released_weights

    meta, out = load_fixture("meta"), load_fixture("vit")
    info = meta["vit"][model]
    path = Path(tmp_dir) / f"{model}.pth"
    if not path.exists():
        torch.save(official_weights(model, meta), path)
    kwargs = dict(img_size=img_size or info["img_size"], patch_size=14, embed_dim=384, depth=12,
                  num_heads=6, num_register_tokens=info["num_register_tokens"],
                  layerscale_init=1.0, interpolate_offset=info["interpolate_offset"],
                  interpolate_antialias=info["interpolate_antialias"])
    kwargs.update(overrides)
    backbone = DinoVisionTransformer(**kwargs).eval()
    report = load_released_weights(backbone, path)
    assert report.ok, report.problems()
    every = [tuple(s) for s in info["sizes"]]
    images = random_images(meta["seeds"]["vit_images"], every)  # all, in the fixture's order
    result = {}
    with torch.no_grad():
        for (h, w), x in zip(every, images, strict=True):
            if sizes is not None and f"{h}x{w}" not in sizes:
                continue
            got = backbone.forward_features(torch.from_numpy(x))
            key = f"{model}/{h}x{w}"
            patches = got["x_norm_patchtokens"][0]
            pos = torch.from_numpy(out[f"{key}/positions"])
            pairs = {
                "cls": (got["x_norm_clstoken"][0], out[f"{key}/cls"]),
                "registers": (got["x_norm_regtokens"][0], out[f"{key}/registers"]),
                "patches": (patches[pos], out[f"{key}/patches"]),
                "patch_mean": (patches.double().mean(0), out[f"{key}/patch_mean"]),
            }
            result[f"{h}x{w}"] = {
                k: float(np.abs(a.numpy().astype(np.float64) - b).max()) if b.size else 0.0
                for k, (a, b) in pairs.items()
            }
    return result


def pos_embed_differences(offset: float | None = None,
                          antialias: bool | None = None) -> dict[str, float]:
    """Max abs differences {"grid/setting/HxW": d} of ``interpolate_pos_embed`` from the
    official ``interpolate_pos_encoding``, with each fixture setting (or the one given)."""
    import torch

    from dinoflow.models.vit import interpolate_pos_embed

    meta, out = load_fixture("meta"), load_fixture("pos_embed")
    result = {}
    for grid_s, targets in meta["pos_embed"]["cases"].items():
        grid = int(grid_s)
        pe = torch.from_numpy(random_pos_embed(meta["seeds"]["pos_embed"] + grid, grid, 4))
        for setting, (off, aa) in meta["pos_embed"]["settings"].items():
            off = off if offset is None else offset
            aa = aa if antialias is None else antialias
            for h, w in targets:
                got = interpolate_pos_embed(pe[:, 1:], (grid, grid), (h, w), off, aa)[0]
                want = out[f"{grid}/{setting}/{h}x{w}"]
                result[f"{grid}/{setting}/{h}x{w}"] = float(np.abs(got.numpy() - want).max())
    return result


# --------------------------------------------------------------------- dinoflow side
def official_name(name: str) -> str:
    """dinoflow head parameter name -> the reference's (torch.nn.utils.weight_norm names)."""
    return name.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")


def stream_masks(grid: tuple[int, int], batches: int, seed: int, **kw) -> tuple[np.ndarray, int]:
    rng = StreamRng(uniform_stream(seed, 4_000_000))
    generator = BlockMaskGenerator(grid, **kw)
    masks = [sample_masks(16, grid, generator, rng).numpy() for _ in range(batches)]
    return np.concatenate(masks), rng.used


class _Recording(BlockMaskGenerator):
    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.pairs: list[tuple[int, int]] = []

    def __call__(self, num_masking_patches, rng):
        mask = super().__call__(num_masking_patches, rng)
        if num_masking_patches > 0:
            self.pairs.append((int(num_masking_patches), int(mask.sum())))
        return mask


def mask_stats(reject_small_blocks: bool) -> dict[str, float]:
    stats = load_fixture("meta")["masking"]["stats"]
    grid = tuple(stats["grid"])
    gen = _Recording(grid, reject_small_blocks=reject_small_blocks)
    rng = np.random.default_rng(0)
    for _ in range(stats["batches"]):
        sample_masks(16, grid, gen, rng)
    want, got = np.array(gen.pairs).T
    short = want - got
    return {"n": len(got), "mean_masked": got.mean(), "se_masked": got.std() / np.sqrt(len(got)),
            "hit_rate": np.mean(got == want), "mean_shortfall": short.mean(),
            "se_shortfall": short.std() / np.sqrt(len(got))}
