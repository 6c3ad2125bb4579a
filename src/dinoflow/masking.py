"""iBOT block masking of the student's global crops (docs/method.md section 3).

Follows dinov2's ``MaskingGenerator`` (dinov2/data/masking.py) and the masking part of
``collate_data_and_cast`` (dinov2/data/collate.py) draw for draw, with a numpy Generator instead
of the global ``random`` module so that masks are reproducible from a seed: the reference's
``random.uniform(a, b)`` is ``a + (b - a) * rng.random()`` here, ``random.randint(a, b)`` is
``rng.integers(a, b + 1)`` and ``random.shuffle`` is ``rng.permutation``. Driven by the same
stream of draws, both give the same masks: 24,000 of 24,000 identical on a 16x16 and 8,000 of
8,000 on a 7x7 grid (tests/unit/test_faithful_reference.py, fixtures made by running the official
code: experiments/faithful/make_fixtures.py).

One difference in how the generator is built: the reference's train.py passes
``max_num_patches=0.5 * img_size // patch_size * img_size // patch_size``, which is 0.5 * H * W
for an even grid (every reference config: 224 / 14 = 16) but floor(H / 2) * W for an odd one
(21 instead of 24.5 on 7x7); dinoflow uses ``max_mask_ratio * H * W``, the value it intends.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """``random.uniform(a, b)``: a + (b - a) * u with u = rng.random(); b may be below a."""
    return a + (b - a) * rng.random()


class BlockMaskGenerator:
    """Union of random rectangular blocks on a (H, W) patch grid (dinov2's MaskingGenerator).

    ``mask = gen(n, rng)`` adds blocks until n patches are masked or a block finds no place in
    ``max_attempts`` tries. Each block: area uniform in [min_num_patches, budget] where budget =
    min(patches still wanted, max_mask_ratio * H * W), aspect ratio log-uniform in [min_aspect,
    max_aspect], sides rounded, h < H and w < W, and it adds 1..budget new patches. So blocks
    are at least ~min_num_patches (rounding may make them smaller) while the budget allows, and
    smaller ones fill the last patches once it is below min_num_patches, as the reference does.

    reject_small_blocks=True is a stricter rule: a block below min_num_patches is never
    placed (masks then stop short of the requested count: by 1.03 patches on average per masked
    16x16 crop, the reference by 0.08; the count is hit 36.6% of the time, the reference's
    92.2%), the total is capped at max_mask_ratio * H * W, and the area is drawn in the sorted
    range (the same distribution, another mapping of the draws). ``last_blocks`` keeps the (top, left, h, w)
    blocks placed by the last call, for inspection.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        max_mask_ratio: float = 0.5,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
        reject_small_blocks: bool = False,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        # a float, as the reference's max_num_patches (0.5 * H * W): 24.5 on a 7x7 grid
        self.max_num_patches = max_mask_ratio * self.num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts
        self.reject_small_blocks = reject_small_blocks
        self.last_blocks: list[tuple[int, int, int, int]] = []

    def _add_block(self, mask: np.ndarray, max_new: float, rng: np.random.Generator) -> int:
        """Try up to max_attempts placements; mask one block adding 1..max_new patches."""
        for _ in range(self.max_attempts):
            if self.reject_small_blocks:
                area = _uniform(rng, *sorted((self.min_num_patches, max_new)))
            else:  # random.uniform(min, max_new): max_new is the smaller one near the target
                area = _uniform(rng, self.min_num_patches, max_new)
            aspect = math.exp(_uniform(rng, *self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if self.reject_small_blocks and h * w < self.min_num_patches:
                continue
            if h >= self.height or w >= self.width:
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
        """(H, W) bool mask with at most num_masking_patches masked."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        self.last_blocks = []
        target = int(num_masking_patches)
        if self.reject_small_blocks:
            target = min(target, int(self.max_num_patches))
        count = 0
        while count < target:
            added = self._add_block(mask, min(target - count, self.max_num_patches), rng)
            if added == 0:  # no placement found: stop short (block granularity)
                break
            count += added
        return mask


@functools.lru_cache(maxsize=16)  # the same few arguments every step of a run
def masked_count_bounds(
    n_crops: int,
    n_patches: int,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> tuple[int, ...]:
    """The most patches ``sample_masks`` can mask in each masked crop, largest first.

    Masked crop i asks for int(n_patches * ratio) patches with ratio at most r_(i+1), so
    int(n_patches * r_(i+1)) bounds it; dinov2's collate sums these into its ``upperbound``.
    """
    n_masked = int(n_crops * mask_probability)
    bands = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    return tuple(sorted((int(n_patches * bands[i + 1]) for i in range(n_masked)), reverse=True))


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
    asks for int(H*W * ratio) patches with ratio uniform in [r_i, r_(i+1)],
    r = linspace(rmin, rmax, n + 1), then the masks are shuffled over crops.
    """
    if (generator.height, generator.width) != tuple(grid):
        raise ValueError(
            f"grid {tuple(grid)} does not match the generator's grid "
            f"{(generator.height, generator.width)}"
        )
    n_patches = grid[0] * grid[1]
    n_masked = int(n_crops * mask_probability)
    # float32, as the reference: torch.linspace, then random.uniform on its 0-d float32 tensors
    # (in float64 the count int(N * ratio) would differ from the reference's now and then)
    bands = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    masks = []
    for i in range(n_masked):
        ratio = bands[i] + (bands[i + 1] - bands[i]) * rng.random()
        masks.append(generator(int(n_patches * ratio), rng))
    masks += [np.zeros(tuple(grid), dtype=bool)] * (n_crops - n_masked)
    if n_crops == 0:
        return torch.zeros(0, n_patches, dtype=torch.bool)
    order = rng.permutation(n_crops)
    return torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_crops, n_patches))
