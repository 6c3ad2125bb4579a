"""KoLeo regulariser (docs/method.md section 4): spreads the L2-normalised CLS features of one view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean_i log(||x_i - x_nn(i)|| + eps) on L2-normalised rows, nearest neighbour by max dot."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D), B >= 2 (one view, local batch) -> scalar, computed in fp32."""
        if x.shape[0] < 2:
            raise ValueError(
                f"KoLeo needs at least 2 samples per view, got a batch of {x.shape[0]}"
            )
        x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-torch.inf)  # a sample is not its own neighbour
            nn_idx = dots.argmax(dim=1)
        dist = torch.linalg.vector_norm(x - x[nn_idx], dim=-1)
        return -torch.log(dist + self.eps).mean()
