"""Gram anchoring (DINOv3, Simeoni et al. 2025, section 4): keep the patch features' similarity
structure close to an earlier teacher's while the global objectives go on.

Long DINOv2 runs lose dense quality: the patch features drift towards the CLS token and their
similarity maps turn noisy, while kNN keeps improving. Gram anchoring adds one term: the mean
squared difference between the student's Gram matrix of L2-normalised patch features of each
global crop and the same matrix of a *Gram teacher*, a frozen copy of the EMA teacher taken
earlier in the run (refreshed now and then, ``dinoflow.methods.dinov2``). It constrains only the
pairwise cosines, so the features themselves remain free to move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_gram(patches: torch.Tensor) -> torch.Tensor:
    """(B, P, D) patch features -> (B, P, P) cosine similarities of each image's patches (fp32)."""
    unit = F.normalize(patches.float(), dim=-1)
    return unit @ unit.transpose(-1, -2)


class GramLoss(nn.Module):
    """Mean over images and patch pairs of (student cosine - Gram teacher cosine) squared.

    forward(student_patches (B, P, D), teacher_patches (B, P, D)) -> scalar. The teacher's
    matrix is a target: no gradient flows into it. Stateless (nothing to checkpoint).
    """

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        if student_patches.shape != teacher_patches.shape:
            raise ValueError(
                f"student patches {tuple(student_patches.shape)} and Gram teacher "
                f"patches {tuple(teacher_patches.shape)} differ"
            )
        with torch.no_grad():
            target = patch_gram(teacher_patches)
        return F.mse_loss(patch_gram(student_patches), target)
