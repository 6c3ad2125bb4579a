"""Load released DINOv2 backbone weights into ``DinoVisionTransformer`` (and write that layout).

Accepted files (read with ``torch.load(weights_only=True)``, nothing downloaded):
- the official facebookresearch/dinov2 layout: ``cls_token`` (1,1,D), ``pos_embed`` (1,1+N,D)
  whose row 0 is the CLS position, ``register_tokens`` (1,R,D), ``mask_token`` (1,D),
  ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
  ls2.gamma}.*`` (``mlp.w12`` / ``mlp.w3`` for the SwiGLU ViT-g), ``norm.*``; also the chunked
  ``blocks.{chunk}.{i}.*`` layout of training checkpoints, and training checkpoints wrapping
  it (``{"teacher": {"backbone.*": ...}}``, ``{"model": {"teacher.backbone.*": ...}}``);
- a timm ``VisionTransformer`` state dict (``reg_token``, pos_embed with or without prefix rows);
- a dinoflow backbone file (``dinoflow.models.vit.save_backbone``).

Mapping to dinoflow's timm backbone (``no_embed_class=True``): the CLS position embedding is a
constant added to the learned CLS token, so it is folded into ``cls_token`` (exactly the
reference's ``cat(cls, patches) + pos_embed`` for the CLS row). Patch position embeddings are
resized once, at load time, to the backbone's grid when they differ, the way the source model
itself resizes them at run time: official files with the backbone's own ``interpolate_offset``
/ ``interpolate_antialias`` (dinov2's ``interpolate_pos_encoding``; set them to the release's:
0.1 / False for the plain releases, 0.0 / True for the register ones, as dinov2's hub builds
them), timm files with timm's ``resample_abs_pos_embed`` (= offset 0, antialias), dinoflow files
with the settings recorded in the file. A backbone whose stored grid is the file's
(``backbone.pos_embed_size`` = 518 for the releases) needs no resize: its forward equals the
released model's at every crop size (tests/unit/test_faithful_reference.py: within 1.9e-6 at 98 px,
0 at 224 and 518 px). Resized to a 224 px backbone, it equals it at 224 px (0) only.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from dinoflow.files import atomic_torch_save
from dinoflow.models.vit import BACKBONE_FORMAT, DinoVisionTransformer, interpolate_pos_embed

__all__ = [
    "LoadReport",
    "hash_tensors",
    "load_released_weights",
    "official_state_dict",
    "resize_pos_embed_official",
    "save_official_layout",
]

_CHUNK_RE = re.compile(r"^blocks\.\d+\.(\d+)\.")  # blocks.{chunk}.{global index}.
_WRAPPER_KEYS = ("teacher", "model", "state_dict")
_PREFIXES = ("teacher.backbone.", "backbone.", "module.")


@dataclass
class LoadReport:
    """What ``load_released_weights`` did.

    source_format: "official", "timm" or "dinoflow".
    loaded: backbone state-dict keys set from the file.
    missing: backbone keys the file does not provide (left as initialised).
    allowed_missing: missing backbone keys the caller allowed (``allow_missing``), left as
        initialised; they do not make the report fail.
    unexpected: file keys (as named in the file) that the backbone has no place for.
    mismatched: (file key, file shape, backbone shape) for keys present in both.
    pos_embed_resized: (file grid, backbone grid) when the patch position embeddings were resized.
    notes: other adaptations (CLS position folded, channels summed, mask token absent...).
    """

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    pos_embed_resized: tuple[tuple[int, int], tuple[int, int]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backbone key was loaded and every file key was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """One line per problem key (empty string when ok)."""
        lines = [f"missing in file: {k}" for k in self.missing]
        lines += [f"unexpected in file: {k}" for k in self.unexpected]
        lines += [
            f"shape mismatch: {k} file {list(a)} vs backbone {list(b)}"
            for k, a, b in self.mismatched
        ]
        return "\n".join(lines)

    def summary(self) -> str:
        """A few lines for a log: counts, adaptations, then every problem key by name."""
        head = f"{self.source_format} layout: {len(self.loaded)} backbone tensors loaded"
        lines = [head]
        if self.pos_embed_resized:
            (a, b), (c, d) = self.pos_embed_resized
            lines.append(f"patch position embeddings resized {a}x{b} -> {c}x{d}")
        if self.allowed_missing:
            lines.append("allowed missing, kept as initialised: " + ", ".join(self.allowed_missing))
        lines += self.notes
        if not self.ok:
            lines.append(self.problems())
        return "\n".join(lines)


def _unwrap(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """-> (flat tensor dict, is_dinoflow_file)."""
    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        return dict(obj["state_dict"]), True
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(
                f"{path}: not a state dict (top-level keys: {sorted(map(str, obj))[:20]})"
            )
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
    return obj, False


def _square_side(n: int) -> int | None:
    s = math.isqrt(n) if n > 0 else 0
    return s if s > 0 and s * s == n else None


def resize_pos_embed_official(
    pe: torch.Tensor, new_grid: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """Patch position embeddings (1, M*M, D) -> (1, H*W, D) float32 as a dinov2 ViT does in
    ``interpolate_pos_encoding`` with these interpolate_offset / interpolate_antialias."""
    m = _square_side(pe.shape[1])
    if m is None:
        raise ValueError(f"pos_embed has {pe.shape[1]} patch rows, not a square grid")
    return interpolate_pos_embed(pe.float(), (m, m), new_grid, offset, antialias)


def load_released_weights(
    backbone: DinoVisionTransformer,
    path: str | os.PathLike[str],
    strict_report: bool = True,
    allow_missing: Sequence[str] = (),
) -> LoadReport:
    """Load a released/official, timm or dinoflow backbone checkpoint into ``backbone``.

    strict_report=True: any missing, unexpected or shape-mismatched key raises ValueError naming
    every one of them, and nothing is loaded. False: the matching keys are loaded and the
    report lists the rest. ``allow_missing``: fnmatch patterns of backbone keys (with or
    without the ``vit.`` prefix, e.g. ``reg_token`` to add registers to a release without them)
    that may be absent from the file; they keep their initial values and are reported in
    ``allowed_missing`` instead of ``missing``. A 3-channel patch embedding loaded into a
    1-channel backbone is summed over the colour channels (timm's adapt_input_conv), noted in
    the report.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: no such file (weights are read from a local file, never downloaded)"
        )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    sd, is_dinoflow = _unwrap(raw, str(path))
    if any(k.startswith("vit.") for k in sd):  # dinoflow state dict without the wrapper
        is_dinoflow = True
    if is_dinoflow:
        sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    official = not is_dinoflow and (
        "register_tokens" in sd
        or "mask_token" in sd
        or any(_CHUNK_RE.match(k) or ".mlp.w12." in k for k in sd)
    )
    report = LoadReport("dinoflow" if is_dinoflow else "official" if official else "timm")
    mapped, origin = _to_timm_keys(sd)
    model_sd = backbone.state_dict()
    if "pos_embed" in mapped and "cls_token" in mapped:
        _fit_pos_embed(mapped, backbone, raw, report, str(path))
    if (
        report.source_format == "official"
        and "reg_token" in mapped
        and (backbone.interpolate_offset, backbone.interpolate_antialias) != (0.0, True)
    ):
        report.notes.append(
            "register release: dinov2's hub interpolates its position embeddings with "
            "interpolate_offset 0.0 and antialias (set pretrain.backbone.interpolate_offset: 0.0, "
            "interpolate_antialias: true to compute as it does at other crop sizes)"
        )
    _fit_channels(mapped, model_sd, report)
    to_load = _compare(mapped, origin, model_sd, allow_missing, report)
    if strict_report and not report.ok:
        raise ValueError(
            f"{path} ({report.source_format} layout) does not fit the backbone:\n"
            f"{report.problems()}\n(keys that may stay as initialised: pretrain.init.allow_missing;"
            " strict_report=False loads the matching keys anyway)"
        )
    backbone.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    return report


def _to_timm_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Official / timm keys -> timm's, and each new key's name in the file."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for k, v in sd.items():
        new = _CHUNK_RE.sub(r"blocks.\1.", k)
        new = new.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        if new == "register_tokens":
            new = "reg_token"
        mapped[new], origin[new] = v, k
    return mapped, origin


def _fit_pos_embed(
    mapped: dict[str, torch.Tensor],
    backbone: DinoVisionTransformer,
    raw: Any,
    report: LoadReport,
    path: str,
) -> None:
    """Fold the file's prefix rows (CLS, registers) into the tokens, resize the patch grid."""
    pe = mapped["pos_embed"].float()
    rows = pe.shape[1]
    n_reg = mapped["reg_token"].shape[1] if "reg_token" in mapped else 0
    n_prefix = next((p for p in (0, 1, 1 + n_reg) if _square_side(rows - p)), None)
    if n_prefix is None:
        raise ValueError(f"{path}: pos_embed has {rows} rows, not a square grid + prefix")
    if n_prefix >= 1:  # the reference adds pos_embed[:, 0] to CLS: fold it in exactly
        cls = mapped["cls_token"]
        mapped["cls_token"] = (cls.float() + pe[:, :1]).to(cls.dtype)
        report.notes.append("CLS position embedding folded into cls_token")
    if n_prefix > 1:
        reg = mapped["reg_token"]
        mapped["reg_token"] = (reg.float() + pe[:, 1:n_prefix]).to(reg.dtype)
        report.notes.append("register position embeddings folded into reg_token")
    pe = pe[:, n_prefix:]
    side = _square_side(rows - n_prefix)
    assert side is not None
    grid = tuple(backbone.vit.patch_embed.grid_size)
    target = backbone.state_dict()["vit.pos_embed"]
    if (side, side) != grid and pe.shape[-1] == target.shape[-1]:
        if report.source_format in ("official", "dinoflow"):
            if report.source_format == "official":
                offset, antialias = backbone.interpolate_offset, backbone.interpolate_antialias
            else:  # the file's own run-time setting (files before it existed: timm's)
                kw = raw.get("kwargs", {}) if isinstance(raw, dict) else {}
                offset = kw.get("interpolate_offset", 0.0)
                antialias = kw.get("interpolate_antialias", True)
            pe = interpolate_pos_embed(
                pe, (side, side), (int(grid[0]), int(grid[1])), offset, antialias
            )
            how = (
                f"as dinov2's interpolate_pos_encoding (interpolate_offset {offset:g}, "
                f"interpolate_antialias {antialias})"
            )
        else:
            pe = resample_abs_pos_embed(
                pe, new_size=list(grid), old_size=[side, side], num_prefix_tokens=0
            )
            how = "with timm resample_abs_pos_embed"
        report.pos_embed_resized = ((side, side), (int(grid[0]), int(grid[1])))
        report.notes.append(f"patch position embeddings resized bicubically {how}")
    mapped["pos_embed"] = pe.to(mapped["pos_embed"].dtype)


def _fit_channels(
    mapped: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], report: LoadReport
) -> None:
    """A colour patch embedding into a grayscale backbone: summed over the channels."""
    pw = mapped.get("patch_embed.proj.weight")
    target = model_sd["vit.patch_embed.proj.weight"]
    if (
        pw is not None
        and pw.ndim == 4
        and pw.shape[1] == 3
        and target.shape[1] == 1
        and pw.shape[0] == target.shape[0]
        and pw.shape[2:] == target.shape[2:]
    ):
        mapped["patch_embed.proj.weight"] = pw.sum(dim=1, keepdim=True)
        report.notes.append("3-channel patch embedding summed to 1 channel")


def _compare(
    mapped: dict[str, torch.Tensor],
    origin: dict[str, str],
    model_sd: dict[str, torch.Tensor],
    allow_missing: Sequence[str],
    report: LoadReport,
) -> dict[str, torch.Tensor]:
    """The tensors that fit the backbone; the report lists unexpected, mismatched, missing."""
    to_load: dict[str, torch.Tensor] = {}
    provided: set[str] = set()
    for k, v in mapped.items():
        model_key = k if k == "mask_token" else f"vit.{k}"
        provided.add(model_key)
        if model_key not in model_sd:
            report.unexpected.append(origin[k])
        elif tuple(v.shape) != tuple(model_sd[model_key].shape):
            report.mismatched.append((origin[k], tuple(v.shape), tuple(model_sd[model_key].shape)))
        else:
            to_load[model_key] = v
    for k in model_sd:
        if k in provided:
            continue
        if k == "mask_token":  # timm files have none; it is zero-initialised and trained
            report.notes.append("no mask_token in the file: kept the zero init")
            continue
        if any(
            fnmatch.fnmatchcase(name, pat)
            for pat in allow_missing
            for name in (k, k.removeprefix("vit."))
        ):
            report.allowed_missing.append(k)
            continue
        report.missing.append(k)
    return to_load


def official_state_dict(
    backbone: DinoVisionTransformer, block_chunks: int = 0
) -> dict[str, torch.Tensor]:
    """The backbone's weights in the official dinov2 key layout (CLS position row = 0)."""
    sd = {
        k.removeprefix("vit."): v.detach().cpu().clone() for k, v in backbone.state_dict().items()
    }
    out: dict[str, torch.Tensor] = {}
    pe = sd.pop("pos_embed")
    out["cls_token"] = sd.pop("cls_token")
    # no_embed_class: CLS position already absorbed in cls_token -> a zero row keeps it exact
    out["pos_embed"] = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
    if "reg_token" in sd:
        out["register_tokens"] = sd.pop("reg_token")
    out["mask_token"] = sd.pop("mask_token")
    swiglu = backbone.backbone_kwargs()["ffn"] == "swiglu"
    depth = backbone.depth
    chunk = depth // block_chunks if block_chunks > 0 else 0
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if swiglu:
                rest = rest.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            k = f"blocks.{i // chunk}.{i}.{rest}" if chunk else f"blocks.{i}.{rest}"
        out[k] = v
    return out


def save_official_layout(
    backbone: DinoVisionTransformer, path: str | os.PathLike[str], block_chunks: int = 0
) -> None:
    """Write the backbone as an official-layout state dict (atomic), e.g. to make test/demo
    checkpoints. block_chunks > 0 writes the chunked ``blocks.{chunk}.{i}`` layout."""
    atomic_torch_save(official_state_dict(backbone, block_chunks), path)


def hash_tensors(digest: Any, state: dict[str, torch.Tensor]) -> Any:
    """Feed every tensor of ``state`` to ``digest`` (a hashlib object), sorted by name: its
    name, then its bytes (any dtype, bf16 included). Returns ``digest``. The identity of weights
    wherever one is needed (a registered model, a frozen teacher, curation's embedder)."""
    for name, value in sorted(state.items()):
        digest.update(name.encode())
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest
