"""iBOT block masking of the student's global crops (DINOV2.md 3).

Follows dinov2's MaskingGenerator and collate_data_and_cast, with a numpy Generator instead of
the global ``random`` module so that masks are reproducible from a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class BlockMaskGenerator:
    """Union of random rectangular blocks on a (H, W) patch grid.

    Each block covers at least ``min_num_patches`` patches, has a log-uniform aspect ratio in
    [min_aspect, max_aspect] and at most ``max_mask_ratio`` of the patches; a mask never
    exceeds the requested count nor ``max_mask_ratio`` of the patches. ``last_blocks`` keeps the
    (top, left, h, w) blocks placed by the last call, for inspection.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        max_mask_ratio: float = 0.5,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.max_num_patches = int(max_mask_ratio * self.num_patches)
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts
        self.last_blocks: list[tuple[int, int, int, int]] = []

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try up to max_attempts placements; mask one block adding 1..max_new patches."""
        for _ in range(self.max_attempts):
            # like random.uniform(min, max_new): max_new may be the smaller one near the target
            area = rng.uniform(*sorted((self.min_num_patches, max_new)))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # rounding can shrink a block below the minimum: reject rather than mask it
            if h * w < self.min_num_patches or h >= self.height or w >= self.width:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= max_new:
                mask[top : top + h, left : left + w] = True
                self.last_blocks.append((top, left, h, w))
                return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """(H, W) bool mask with at most num_masking_patches (and max_mask_ratio) masked."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        self.last_blocks = []
        target = min(int(num_masking_patches), self.max_num_patches)
        count = 0
        while count < target:
            added = self._add_block(mask, target - count, rng)
            if added == 0:  # no placement found: stop short (block granularity)
                break
            count += added
        return mask


def sample_masks(
    n_crops: int,
    grid: tuple[int, int],
    generator: BlockMaskGenerator,
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """Masks for the n_crops global crops of a batch -> (n_crops, H*W) bool.

    Exactly int(n_crops * mask_probability) crops are masked (not a coin flip); masked crop i
    draws its ratio uniformly in [r_i, r_(i+1)], r = linspace(rmin, rmax, n + 1), then the
    masks are shuffled over crops.
    """
    if (generator.height, generator.width) != tuple(grid):
        raise ValueError(
            f"grid {tuple(grid)} does not match the generator's grid "
            f"{(generator.height, generator.width)}"
        )
    n_patches = grid[0] * grid[1]
    n_masked = int(n_crops * mask_probability)
    bands = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    masks = [
        generator(int(n_patches * rng.uniform(bands[i], bands[i + 1])), rng)
        for i in range(n_masked)
    ]
    masks += [np.zeros(tuple(grid), dtype=bool)] * (n_crops - n_masked)
    if n_crops == 0:
        return torch.zeros(0, n_patches, dtype=torch.bool)
    order = rng.permutation(n_crops)
    return torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_crops, n_patches))
