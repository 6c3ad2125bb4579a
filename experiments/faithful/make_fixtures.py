"""Run Meta's official DINOv2 code on fixed inputs; write its outputs as test fixtures.

    python -m experiments.faithful.make_fixtures --dinov2 /path/to/dinov2 \
        [--out tests/fixtures/dinov2_reference]

``--dinov2`` is a local copy of https://github.com/facebookresearch/dinov2: a checkout, or a
bare git directory (then HEAD is extracted to a temporary folder). Nothing of that code is
copied into this repository: it is imported from that path and run; only its outputs (a few
hundred KB of npz/json) are written. On CPU it needs no xFormers (its layers fall back to plain
PyTorch) and nothing beyond dinoflow's own environment (torch, numpy). Functions of
``dinov2/train/train.py`` (which imports xFormers-only training code at module level) are
compiled from that file's source with ``ast`` and run alone.

The inputs (random weights, images, position embeddings, the shared random stream) come from
``experiments/faithful/reference.py``, so the tests regenerate them from the seeds recorded here.
About 2 minutes on 2 CPU cores. What each fixture holds: ``meta.json``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import platform
import random
import subprocess
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch

from experiments.faithful import reference as ref

ROOT = Path(__file__).resolve().parents[2]

HEAD = dict(in_dim=16, out_dim=20, hidden_dim=32, bottleneck_dim=8, nlayers=3)
LR, WD = 0.01, 0.04
VIT_SIZES = {"vits14_518": [(98, 98), (224, 224), (518, 518), (98, 224)],
             "vits14_reg4_518": [(98, 98), (224, 224), (518, 518), (98, 224)],
             "vits14_224": [(98, 98), (224, 224)]}
# name -> (img_size, registers, interpolate_offset, interpolate_antialias): the official
# settings of the plain releases (hub: 0.1 / False, = the training default) and of the
# register releases (hub: 0.0 / True); vits14_224 is a model trained at 224 px (its local
# crops at 98 px are interpolated from its 16x16 grid)
VITS = {"vits14_518": (518, 0, 0.1, False), "vits14_reg4_518": (518, 4, 0.0, True),
        "vits14_224": (224, 0, 0.1, False)}
POS_SETTINGS = {"offset0.1": (0.1, False), "offset0_antialias": (0.0, True)}
POS_CASES = {37: [(7, 7), (16, 16), (7, 16)], 16: [(7, 7), (37, 37)]}
SCHEDULES = {
    # name -> dinov2 config values (OFFICIAL_EPOCH_LENGTH iterations per epoch)
    "small": dict(OFFICIAL_EPOCH_LENGTH=10, epochs=12, lr=1e-3, min_lr=1e-6, warmup_epochs=2,
                  weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.992,
                  final_momentum_teacher=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
                  warmup_teacher_temp_epochs=3, freeze_last_layer_epochs=1),
    "recipe_epochs": dict(OFFICIAL_EPOCH_LENGTH=10, epochs=100, lr=1e-3, min_lr=1e-6,
                          warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                          momentum_teacher=0.992, final_momentum_teacher=1.0,
                          warmup_teacher_temp=0.04, teacher_temp=0.07,
                          warmup_teacher_temp_epochs=30, freeze_last_layer_epochs=1),
}
MASK_STREAM = {"16x16": dict(grid=(16, 16), batches=1500, seed=16),
               "7x7": dict(grid=(7, 7), batches=500, seed=7)}
MASK_BATCH = 8  # images per batch: 16 global crops, 8 of them masked
MASK_STATS = dict(grid=(16, 16), batches=1500, python_random_seed=0)
SEEDS = dict(head=0, head_inputs=1, vit_weights=2, vit_images=3, pos_embed=4)


def official_source(path: Path) -> tuple[Path, str]:
    """(folder holding the ``dinov2`` package, commit or 'unknown')."""
    if (path / "dinov2" / "__init__.py").is_file():
        try:
            commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
        return path, commit
    commit = subprocess.run(["git", "--git-dir", str(path), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix="dinov2-"))
    archive = subprocess.run(["git", "--git-dir", str(path), "archive", "HEAD"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, commit


def function_from(source: Path, name: str, namespace: dict) -> types.FunctionType:
    """Compile one top-level function of an official source file and return it."""
    tree = ast.parse(source.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), str(source), "exec"), namespace)
    return namespace[name]


class Cfg(dict):
    """The attribute and item access dinov2's OmegaConf config offers."""

    __getattr__ = dict.__getitem__


def weights_digest(weights: dict) -> str:
    """sha256 over the weights' bytes in layout order: the tests regenerate the same ones."""
    digest = hashlib.sha256()
    for v in weights.values():
        digest.update(np.ascontiguousarray(v).tobytes())
    return digest.hexdigest()


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------- head
def head_fixture(dinov2: Path) -> tuple[dict, dict]:
    from dinov2.layers import DINOHead
    from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay

    apply_optim_scheduler = function_from(dinov2 / "dinov2/train/train.py",
                                          "apply_optim_scheduler", {})
    rng = np.random.default_rng(SEEDS["head_inputs"])
    x = torch.from_numpy(rng.standard_normal((6, HEAD["in_dim"]), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((6, HEAD["out_dim"]), dtype=np.float32))
    g_random = torch.from_numpy(rng.uniform(0.5, 1.5, (HEAD["out_dim"], 1)).astype(np.float32))
    arrays, info = {"x": f32(x), "w": f32(w)}, {}
    for case in ("init", "random_g"):
        torch.manual_seed(SEEDS["head"])
        head = DINOHead(**HEAD)
        if case == "random_g":
            with torch.no_grad():
                head.last_layer.weight_g.copy_(g_random)
        for k, v in head.state_dict().items():
            arrays[f"{case}/state/{k}"] = f32(v)
        trainable = [n for n, p in head.named_parameters() if p.requires_grad]
        groups = get_params_groups_with_decay(head, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
        info[case] = {
            "trainable": trainable,
            "groups": {d["name"]: {"lr_multiplier": d["lr_multiplier"],
                                   "wd_multiplier": d["wd_multiplier"],
                                   "is_last_layer": d["is_last_layer"]} for d in groups},
        }
        fused = list(fuse_params_groups(groups))
        for g in fused:
            g["foreach"] = True  # as SSLMetaArch.get_maybe_fused_params_for_submodel
        opt = torch.optim.AdamW(fused, betas=(0.9, 0.999))
        for step, last_layer_lr in ((1, 0.0), (2, LR)):  # step 1: last layer frozen
            opt.zero_grad()
            out = head(x)
            (out * w).sum().backward()
            if step == 1:
                arrays[f"{case}/out"] = f32(out)
                for n, p in head.named_parameters():
                    arrays[f"{case}/grad/{n}"] = f32(p.grad)
            apply_optim_scheduler(opt, LR, WD, last_layer_lr)
            opt.step()
            for n, p in head.named_parameters():
                arrays[f"{case}/step{step}/{n}"] = f32(p)
    return arrays, info


# ----------------------------------------------------------------------------- param groups
def backbone_groups_fixture() -> dict:
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models import vision_transformer as vits
    from dinov2.utils.param_groups import get_params_groups_with_decay

    # a 2-block ViT built like vit_small (its block and attention classes)
    model = vits.DinoVisionTransformer(patch_size=14, img_size=56, embed_dim=32, depth=2,
                                       num_heads=2, mlp_ratio=4, init_values=1.0, block_chunks=0,
                                       num_register_tokens=4,
                                       block_fn=partial(Block, attn_class=MemEffAttention))
    groups = get_params_groups_with_decay(model, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    return {d["name"]: {"lr_multiplier": d["lr_multiplier"], "wd_multiplier": d["wd_multiplier"],
                        "is_last_layer": d["is_last_layer"]} for d in groups}


# ----------------------------------------------------------------------------- ViT forward
def vit_fixture() -> tuple[dict, dict]:
    from dinov2.models import vision_transformer as vits

    arrays, info = {}, {}
    for name, (img, n_reg, offset, antialias) in VITS.items():
        model = vits.vit_small(patch_size=14, img_size=img, init_values=1.0, block_chunks=0,
                               num_register_tokens=n_reg, interpolate_offset=offset,
                               interpolate_antialias=antialias).eval()
        layout = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        weights = ref.random_official_state_dict(layout, SEEDS["vit_weights"])
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
        sizes = VIT_SIZES[name]
        info[name] = {"img_size": img, "num_register_tokens": n_reg,
                      "interpolate_offset": offset, "interpolate_antialias": antialias,
                      "layout": layout, "sizes": sizes,
                      "weights_sha256": weights_digest(weights)}
        images = ref.random_images(SEEDS["vit_images"], sizes)
        with torch.no_grad():
            for (h, w), x in zip(sizes, images, strict=True):
                out = model.forward_features(torch.from_numpy(x))
                patches = out["x_norm_patchtokens"][0]
                key = f"{name}/{h}x{w}"
                arrays[f"{key}/cls"] = f32(out["x_norm_clstoken"][0])
                arrays[f"{key}/registers"] = f32(out["x_norm_regtokens"][0])
                pos = ref.token_positions(patches.shape[0])
                arrays[f"{key}/positions"] = pos
                arrays[f"{key}/patches"] = f32(patches[torch.from_numpy(pos)])
                arrays[f"{key}/patch_mean"] = patches.double().mean(0).numpy()  # float64
    return arrays, info


# ----------------------------------------------------------------------------- position embeddings
def pos_embed_fixture() -> dict:
    from dinov2.models.vision_transformer import DinoVisionTransformer

    arrays = {}
    for grid, targets in POS_CASES.items():
        pe = torch.from_numpy(ref.random_pos_embed(SEEDS["pos_embed"] + grid, grid, 4))
        for setting, (offset, antialias) in POS_SETTINGS.items():
            # the method alone, on an object holding what it reads
            holder = types.SimpleNamespace(pos_embed=pe, patch_size=14,
                                           interpolate_offset=offset,
                                           interpolate_antialias=antialias)
            for h, w in targets:
                x = torch.zeros(1, 1 + h * w, 4)
                out = DinoVisionTransformer.interpolate_pos_encoding(holder, x, 14 * h, 14 * w)
                assert torch.equal(out[:, 0], pe[:, 0])  # the CLS row is never interpolated
                arrays[f"{grid}/{setting}/{h}x{w}"] = f32(out[0, 1:])
    return arrays


# ----------------------------------------------------------------------------- masking
def _collate_masks(collate, generator, n_batches: int, n_tokens: int) -> np.ndarray:
    crop = torch.zeros(1, 1, 1)
    samples = [({"global_crops": [crop, crop], "local_crops": [crop]}, ())] * MASK_BATCH
    masks = []
    for _ in range(n_batches):
        batch = collate(samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5,
                        dtype=torch.float32, n_tokens=n_tokens, mask_generator=generator)
        masks.append(batch["collated_masks"].numpy())
    return np.concatenate(masks)


def masking_fixture() -> tuple[dict, dict]:
    masking = importlib.import_module("dinov2.data.masking")
    collate_mod = importlib.import_module("dinov2.data.collate")
    arrays, info = {}, {}
    for name, spec in MASK_STREAM.items():
        h, w = spec["grid"]
        stream = ref.StreamRandom(ref.uniform_stream(spec["seed"], 4_000_000))
        masking.random, collate_mod.random = stream, stream  # both modules draw from it
        generator = masking.MaskingGenerator(input_size=(h, w), max_num_patches=0.5 * h * w)
        masks = _collate_masks(collate_mod.collate_data_and_cast, generator, spec["batches"],
                               h * w)
        packed = np.packbits(masks, axis=1)
        arrays[f"{name}/counts"] = masks.sum(1).astype(np.int16)
        arrays[f"{name}/first_masks"] = packed[:128]
        info[name] = {**spec, "n_masks": int(len(masks)), "draws_used": stream.used,
                      "sha256_packed": hashlib.sha256(packed.tobytes()).hexdigest()}
    masking.random, collate_mod.random = random, random

    # statistics with python's own random: requested vs masked count of each masked crop
    h, w = MASK_STATS["grid"]
    random.seed(MASK_STATS["python_random_seed"])
    generator = masking.MaskingGenerator(input_size=(h, w), max_num_patches=0.5 * h * w)
    pairs: list[tuple[int, int]] = []

    def recording(n=0):
        mask = generator(n)
        if n > 0:
            pairs.append((int(n), int(mask.sum())))
        return mask

    _collate_masks(collate_mod.collate_data_and_cast, recording, MASK_STATS["batches"], h * w)
    want, got = np.array(pairs).T
    info["stats"] = {
        **MASK_STATS, "masked_crops": len(pairs),
        "mean_masked": float(got.mean()), "std_masked": float(got.std()),
        "mean_requested": float(want.mean()), "hit_rate": float(np.mean(got == want)),
        "mean_shortfall": float(np.mean(want - got)),
    }
    return arrays, info


# ----------------------------------------------------------------------------- schedules
def schedules_fixture(dinov2: Path) -> tuple[dict, dict]:
    from dinov2.utils.utils import CosineScheduler

    build = function_from(dinov2 / "dinov2/train/train.py", "build_schedulers",
                          {"CosineScheduler": CosineScheduler,
                           "logger": types.SimpleNamespace(info=lambda *a: None)})
    arrays, info = {}, {}
    for name, c in SCHEDULES.items():
        cfg = Cfg(
            train=Cfg(OFFICIAL_EPOCH_LENGTH=c["OFFICIAL_EPOCH_LENGTH"]),
            optim=Cfg({k: c[k] for k in ("epochs", "lr", "min_lr", "warmup_epochs",
                                         "weight_decay", "weight_decay_end",
                                         "freeze_last_layer_epochs")}),
            teacher=Cfg({k: c[k] for k in ("momentum_teacher", "final_momentum_teacher",
                                           "warmup_teacher_temp", "teacher_temp",
                                           "warmup_teacher_temp_epochs")}),
        )
        with np.errstate(divide="ignore", invalid="ignore"):  # its empty cosine part
            scheds = build(cfg)
        total = c["epochs"] * c["OFFICIAL_EPOCH_LENGTH"]
        for key, s in zip(("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"), scheds, strict=True):
            arrays[f"{name}/{key}"] = np.array([s[i] for i in range(total)], dtype=np.float64)
        info[name] = c
    return arrays, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dinov2", type=Path, required=True,
                        help="facebookresearch/dinov2: a checkout or a bare git directory")
    parser.add_argument("--out", type=Path, default=ref.FIXTURES)
    args = parser.parse_args()
    dinov2, commit = official_source(args.dinov2.resolve())
    sys.path.insert(0, str(dinov2))
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict = {"dinov2_commit": commit, "torch": torch.__version__, "numpy": np.__version__,
                  "python": platform.python_version(), "seeds": SEEDS,
                  "head": {"config": HEAD, "lr": LR, "wd": WD}}

    arrays, meta["head"]["official"] = head_fixture(dinov2)
    np.savez_compressed(args.out / "head.npz", **arrays)
    meta["backbone_param_groups"] = backbone_groups_fixture()
    arrays, meta["vit"] = vit_fixture()
    np.savez_compressed(args.out / "vit.npz", **arrays)
    np.savez_compressed(args.out / "pos_embed.npz", **pos_embed_fixture())
    meta["pos_embed"] = {"settings": POS_SETTINGS, "cases": {str(k): v for k, v in POS_CASES.items()},
                         "dim": 4, "patch_size": 14}
    arrays, meta["masking"] = masking_fixture()
    np.savez_compressed(args.out / "masking.npz", **arrays)
    arrays, meta["schedules"] = schedules_fixture(dinov2)
    np.savez_compressed(args.out / "schedules.npz", **arrays)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({total / 1024:.0f} KB) from dinov2 {commit}")


if __name__ == "__main__":
    main()
