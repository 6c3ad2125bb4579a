"""Training health: collapse detection and the non-finite-loss guard (docs/method.md section 7)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from dinoflow.errors import TrainingDiverged

if TYPE_CHECKING:
    from dinoflow.config import PretrainConfig

__all__ = [
    "TrainingDiverged",
    "check_finite",
    "collapse_warning",
    "divergence_advice",
    "normalized_std",
    "target_entropy",
]


def divergence_advice(cfg: PretrainConfig | None) -> str:
    """What this run can change after a non-finite loss (only settings it does not use yet)."""
    if cfg is None:
        return "Lower pretrain.optim.base_lr or check the input normalisation."
    o, advice = cfg.optim, [f"lower pretrain.optim.base_lr (now {cfg.optim.base_lr:g})"]
    if o.clip_grad is None:
        advice.append("set pretrain.optim.clip_grad=3.0")
    elif o.clip_grad > 1.0:
        advice.append(f"lower pretrain.optim.clip_grad (now {o.clip_grad:g})")
    if cfg.loss.centering != "sinkhorn_knopp":
        advice.append("use pretrain.loss.centering=sinkhorn_knopp")
    if cfg.train.precision == "bf16":
        advice.append("train in pretrain.train.precision=fp32")
    if o.warmup_epochs < 1:
        advice.append(f"lengthen pretrain.optim.warmup_epochs (now {o.warmup_epochs:g})")
    return "Try to " + ", or ".join(advice) + "; and check the input normalisation."


def check_finite(
    step: int,
    terms: dict[str, torch.Tensor],
    checkpoint: str | None,
    cfg: PretrainConfig | None = None,
) -> None:
    """Raise naming the step and every non-finite loss term, with advice for this run."""
    bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
    if bad:
        kept = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint else ""
        raise TrainingDiverged(
            f"step {step}: non-finite loss in {', '.join(bad)} "
            f"({', '.join(f'{n}={float(terms[n].detach()):.4g}' for n in bad)}){kept}. "
            + divergence_advice(cfg)
        )


def target_entropy(targets: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of teacher target distributions (M, K)."""
    t = targets.float()
    return -(t * torch.log(t.clamp_min(1e-12))).sum(-1).mean()


def normalized_std(cls: torch.Tensor) -> torch.Tensor:
    """Std over the batch of the L2-normalised CLS, averaged over dims (collapse -> 0; healthy ~ 1/sqrt(D))."""
    x = torch.nn.functional.normalize(cls.float(), dim=-1)
    return x.std(dim=0).mean()


def collapse_warning(
    entropy: float, n_prototypes: int, uniform_fraction: float = 0.95, onehot_entropy: float = 0.05
) -> str | None:
    """A message naming the kind of collapse and what to change, or None when healthy."""
    max_entropy = math.log(n_prototypes)
    if entropy > uniform_fraction * max_entropy:
        return (
            f"uniform collapse: teacher target entropy {entropy:.3f} is near ln(K)={max_entropy:.3f}; "
            "targets are near uniform. Usual in the first steps of a run; if it lasts, lower "
            "optim.teacher_temp_start/end, use fewer head.n_prototypes, raise optim.base_lr or "
            "backbone.layerscale_init, or use loss.centering=sinkhorn_knopp."
        )
    if entropy < onehot_entropy:
        return (
            f"one-hot collapse: teacher target entropy {entropy:.4f} is near 0; all images map to "
            "a few prototypes. Raise optim.teacher_temp_start/end, lower optim.base_lr, or keep the "
            "center momentum at 0.9 / use sinkhorn_knopp centering."
        )
    return None
