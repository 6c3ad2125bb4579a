"""DINO loss on CLS tokens (docs/method.md section 4): student crops vs teacher global crops, no same view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.losses.centering import SoftmaxCentering, sinkhorn_knopp

CENTERINGS = ("softmax", "sinkhorn_knopp")


def make_centering(centering: str, out_dim: int, momentum: float) -> SoftmaxCentering | None:
    """SoftmaxCentering for "softmax", None for "sinkhorn_knopp" (stateless)."""
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    return SoftmaxCentering(out_dim, momentum) if centering == "softmax" else None


class DINOLoss(nn.Module):
    """Cross-entropy between teacher targets and student log-probabilities of CLS prototypes."""

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
        self.centering = make_centering(centering, out_dim, center_momentum)

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(2, B, K) teacher logits -> (2, B, K) targets; updates the center after use."""
        flat = teacher_logits.flatten(0, 1)
        if self.centering is None:
            targets = sinkhorn_knopp(flat, teacher_temp, self.sinkhorn_iterations)
        else:
            targets = self.centering.targets(flat, teacher_temp)
            self.centering.update(flat)
        return targets.view(teacher_logits.shape)

    def forward(
        self, student_global: torch.Tensor, student_local: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Mean over the 2 + 2N (student view, teacher view) pairs of mean_b CE(target, student).

        student_global (2, B, K), student_local (N, B, K) with N >= 0, targets (2, B, K).
        Student global i is paired with teacher j != i only; locals with both teachers.
        With N = 0 this is the mean of the 2 global pairs. dinov2 divides by 2 + max(2N, 1),
        i.e. by 3 when N = 0 (its max(., 1) guards the local term's division): decision
        (docs/faithfulness.md) to keep the mean over the pairs that exist, so the DINO term
        keeps its scale with or without local crops; with N >= 1 both are the same.
        """
        n_global = student_global.shape[0]
        student = torch.cat([student_global, student_local]).float()  # (V, B, K)
        log_p = F.log_softmax(student / self.student_temp, dim=-1)
        # ce[v, j] = mean_b -sum_k targets[j, b, k] * log_p[v, b, k]
        ce = -torch.einsum("jbk,vbk->vj", targets.float(), log_p) / student.shape[1]
        keep = torch.ones_like(ce, dtype=torch.bool)
        keep[:n_global, :n_global].fill_diagonal_(False)  # never the same view
        return ce[keep].mean()
