"""Optimiser plumbing (docs/method.md section 5): parameter groups with layer-wise lr decay, AdamW,
per-step schedule application, per-module gradient clipping and the teacher EMA.
"""

from __future__ import annotations

import torch
from torch import nn

# backbone parameters that sit "below" block 0 (dinov2's get_vit_lr_decay_rate, layer id 0)
_EMBED_TOKENS = ("cls_token", "pos_embed", "reg_token", "register_tokens", "mask_token")


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("blocks") + 1]) if "blocks" in parts else None


def _lr_multiplier(name: str, depth: int, layer_decay: float, patch_embed_lr_mult: float) -> float:
    """Backbone parameter -> lr multiplier: block i (0-based) of L gets decay**(L - i),
    patch embedding and tokens decay**(L + 1) (patch embedding further * patch_embed_lr_mult),
    anything after the blocks (final norm) 1."""
    parts = name.split(".")
    if "patch_embed" in parts:
        return layer_decay ** (depth + 1) * patch_embed_lr_mult
    if parts[-1] in _EMBED_TOKENS:
        return layer_decay ** (depth + 1)
    block = _block_index(name)
    return 1.0 if block is None else layer_decay ** (depth - block)


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and LayerScale gammas are not decayed (tokens and weights are)."""
    return param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name


def param_groups(
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
) -> list[dict]:
    """Trainable parameters grouped by (lr_multiplier, wd_multiplier, is_last_layer).

    Each group: {"params", "param_names", "name", "lr_multiplier", "wd_multiplier",
    "is_last_layer"}; backbone names are paths in ``backbone`` (``vit.blocks.0.attn.qkv.weight``,
    ``mask_token``), head names ``<head key>.<path>``. Heads get lr multiplier 1; parameters
    whose name contains ``last_layer`` are flagged is_last_layer (frozen in the first epoch).
    """
    named = [n for n, p in backbone.named_parameters() if p.requires_grad]
    depth = 1 + max((b for b in map(_block_index, named) if b is not None), default=-1)
    entries: list[tuple[str, nn.Parameter, float, bool, bool]] = []
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            lr_mult = _lr_multiplier(name, depth, layer_decay, patch_embed_lr_mult)
            entries.append((name, p, lr_mult, False, True))
    for head_name, head in heads.items():
        for name, p in head.named_parameters():
            if p.requires_grad:
                entries.append((f"{head_name}.{name}", p, 1.0, "last_layer" in name, False))

    # one group per distinct setting keeps the optimiser's foreach/fused kernels batched;
    # backbone and heads never share a group (the head warm-up scales the backbone's lr alone)
    groups: dict[tuple[float, float, bool, bool], dict] = {}
    for name, p, lr_mult, last, in_backbone in entries:
        wd_mult = 0.0 if _no_weight_decay(name, p) else 1.0
        key = (round(lr_mult, 12), wd_mult, last, in_backbone)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr_multiplier": lr_mult,
                "wd_multiplier": wd_mult,
                "is_last_layer": last,
                "is_backbone": in_backbone,
                "name": ("backbone_" if in_backbone else "head_")
                + f"lr{lr_mult:.4g}_wd{wd_mult:g}"
                + ("_last_layer" if last else ""),
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(
    groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` output; lr and weight decay are set by apply_schedules.

    fused=None picks the fused kernel when every parameter is on CUDA, foreach otherwise.
    """
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=betas, **kwargs)


def apply_schedules(
    optimizer: torch.optim.Optimizer,
    lr: float,
    wd: float,
    freeze_last_layer: bool,
    backbone_lr_scale: float = 1.0,
) -> None:
    """Set each group's lr = lr * lr_multiplier (0 for the last layer while frozen) and
    weight_decay = wd * wd_multiplier."""
    for group in optimizer.param_groups:
        frozen = freeze_last_layer and group.get("is_last_layer", False)
        scale = backbone_lr_scale if group.get("is_backbone", False) else 1.0
        group["lr"] = 0.0 if frozen else float(lr) * group.get("lr_multiplier", 1.0) * scale
        group["weight_decay"] = float(wd) * group.get("wd_multiplier", 1.0)


def clip_gradients(modules: dict[str, nn.Module], max_norm: float = 3.0) -> dict[str, float]:
    """Clip each module's gradient norm to max_norm separately -> {name: norm before clipping}."""
    norms: dict[str, float] = {}
    for name, module in modules.items():
        grads = [p for p in module.parameters() if p.grad is not None]
        norms[name] = (
            float(torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)) if grads else 0.0
        )
    return norms


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Teacher EMA: t = m * t + (1 - m) * s for every parameter (same order in both modules)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    m = float(momentum)
    # lerp t + (1 - m) * (s - t): exactly t where t == s (mul + add drifts by an ulp), so a
    # teacher that equals a frozen student stays bit-identical (continued-pretraining warm-up)
    torch._foreach_lerp_(t_params, s_params, 1.0 - m)
