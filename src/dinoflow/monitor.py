"""Training health: collapse detection and the non-finite-loss guard (DINOV2.md section 7)."""

from __future__ import annotations

import math

import torch


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


def check_finite(step: int, terms: dict[str, torch.Tensor], checkpoint: str | None) -> None:
    """Raise naming the step and every non-finite loss term."""
    bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
    if bad:
        kept = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint else ""
        raise TrainingDiverged(
            f"step {step}: non-finite loss in {', '.join(bad)} "
            f"({', '.join(f'{n}={float(terms[n].detach()):.4g}' for n in bad)}){kept}. "
            "Lower optim.base_lr, check the input normalisation, or use loss.centering=sinkhorn_knopp."
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
