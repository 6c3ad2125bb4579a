"""Fixtures of the unit tests (tests/unit mirrors src/dinoflow)."""

import pytest
import torch
from torch import nn


class TinyBackbone(nn.Module):
    """Stand-in with the DinoVisionTransformer interface: conv patchifier + residual MLP blocks."""

    def __init__(self, in_chans: int = 1, dim: int = 16, patch: int = 4, depth: int = 3) -> None:
        super().__init__()
        self.embed_dim, self.patch_size, self.depth, self.in_chans = dim, patch, depth, in_chans
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def get_intermediate_layers(self, x, n=1):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = t + torch.tanh(blk(t))
            if i >= self.depth - n:
                y = self.norm(t)
                outs.append((y, y.mean(dim=1)))
        return outs

    def forward(self, x):
        return self.get_intermediate_layers(x)[-1][1]

    def forward_patches(self, x):
        return self.get_intermediate_layers(x)[-1][0]



@pytest.fixture(scope="session")
def tiny_backbone() -> type[TinyBackbone]:
    """The class ``TinyBackbone(in_chans=1, dim=16, patch=4, depth=3)``: a stand-in with the
    DinoVisionTransformer interface (conv patchifier + residual MLP blocks)."""
    return TinyBackbone
