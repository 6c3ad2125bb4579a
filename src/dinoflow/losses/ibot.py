"""iBOT loss on masked patch tokens of the global crops (docs/method.md section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.losses.centering import sinkhorn_knopp
from dinoflow.losses.dino import make_centering


def masked_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """(n_crops, N) bool masks -> (M,) weight 1 / (#masked tokens in the crop) per masked token.

    Ordered like ``tokens[masks]`` (crop-major), M = masks.sum().
    """
    per_crop = 1.0 / masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    return per_crop.expand(masks.shape)[masks]


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student prototypes at the masked positions."""

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "softmax",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.sinkhorn_iterations = sinkhorn_iterations
        self.centering = make_centering(centering, out_dim, center_momentum)  # own center

    @torch.no_grad()
    def teacher_targets(
        self, teacher_masked_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """(M, K) teacher logits at the masked positions -> (M, K) targets (updates the center)."""
        if self.centering is None:
            return sinkhorn_knopp(teacher_masked_logits, teacher_temp, self.sinkhorn_iterations)
        targets = self.centering.targets(teacher_masked_logits, teacher_temp)
        self.centering.update(teacher_masked_logits)
        return targets

    def forward(
        self,
        student_masked_logits: torch.Tensor,
        targets: torch.Tensor,
        masks_weight: torch.Tensor,
        n_global_crops: int,
    ) -> torch.Tensor:
        """sum_m w_m * CE_m / n_global_crops.

        student_masked_logits, targets (M, K); masks_weight (M,) from ``masked_token_weights``;
        n_global_crops = all global crops of the batch (2 * B), masked or not.
        """
        log_p = F.log_softmax(student_masked_logits.float() / self.student_temp, dim=-1)
        ce = -(targets.float() * log_p).sum(dim=-1)  # (M,)
        return (ce * masks_weight.float()).sum() / n_global_crops
