"""DINO projection head (docs/method.md section 2), as the reference ``dinov2/layers/dino_head.py``.

Checked against that code (tests/unit/test_faithful_reference.py, fixtures from
experiments/faithful/make_fixtures.py): for the same weights and inputs the outputs and the
gradients agree within 2e-7 relative to each tensor's largest value, the weights after two AdamW
steps (the first with the last layer frozen) within 1.2e-6, and the trainable tensors and their
lr / wd multipliers are the same, ``weight_g`` included (docs/faithfulness.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int) -> nn.Module:
    """nlayers Linear layers with GELU between them (no BatchNorm), ending at bottleneck_dim."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalise -> weight-normalised linear (no bias) to K prototypes.

    (..., in_dim) -> (..., out_dim). ``last_layer`` is ``parametrizations.weight_norm`` of a
    bias-free Linear: weight = g * v / ||v|| row by row. Its magnitude ``g``
    (``last_layer.parametrizations.weight.original0``, shape (out_dim, 1), the reference's
    ``weight_g``) starts at 1.

    norm_last_layer=False (DINOv2, the default): g is trained like the reference's, in the
    last-layer parameter group (name contains ``last_layer``), so it is frozen with the
    prototypes during ``freeze_last_layer_epochs`` and, as in the reference's parameter groups,
    gets weight decay. True (DINOv1's ``norm_last_layer``): g stays 1 and is not trained, so
    every prototype row has unit norm and the logits are cosine similarities.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim)
        self.mlp.apply(self._init_weights)
        # Direction v keeps nn.Linear's default init (the reference applies its trunc-normal
        # init before creating last_layer).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        self.norm_last_layer = norm_last_layer
        g.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_dim) -> logits (..., out_dim)."""
        x = self.mlp(x)
        # fp16 cannot represent 1e-12; the reference switches eps the same way
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
