"""iBOT block masking (DINOV2.md 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.masking import BlockMaskGenerator, sample_masks

GRID = (16, 16)  # 224 / 14, the reference grid
N = GRID[0] * GRID[1]


def test_exactly_half_of_the_crops_are_masked() -> None:
    gen = BlockMaskGenerator(GRID)
    for n_crops, n_masked in ((16, 8), (6, 3), (5, 2)):
        masks = sample_masks(n_crops, GRID, gen, np.random.default_rng(n_crops))
        assert masks.shape == (n_crops, N) and masks.dtype == torch.bool
        assert int((masks.sum(1) > 0).sum()) == n_masked


def test_stratified_ratio_bands() -> None:
    gen = BlockMaskGenerator(GRID)
    n_masked = 8
    bands = np.linspace(0.1, 0.5, n_masked + 1)
    lo, hi = (N * bands[:-1]).astype(int), (N * bands[1:]).astype(int)
    tol = gen.min_num_patches  # block granularity: the last block may not fit exactly
    for seed in range(20):
        masks = sample_masks(2 * n_masked, GRID, gen, np.random.default_rng(seed))
        counts = np.sort(masks.sum(1).numpy())[-n_masked:]
        # bands are disjoint and increasing, so the k-th smallest count lies in band k
        assert (counts <= hi).all() and (counts >= lo - tol).all(), (counts, lo, hi)
        assert lo.sum() - n_masked * tol <= counts.sum() <= hi.sum()


def test_masks_are_shuffled_over_crops() -> None:
    gen = BlockMaskGenerator(GRID)
    masked_rows = {
        tuple(np.flatnonzero(sample_masks(8, GRID, gen, np.random.default_rng(s)).sum(1).numpy()))
        for s in range(10)
    }
    assert len(masked_rows) > 1  # not always the same crops (e.g. not the first half)


def test_blocks_are_big_enough_and_form_the_mask() -> None:
    gen = BlockMaskGenerator(GRID)
    rng = np.random.default_rng(0)
    for target in (4, 10, 25, 60, 128):
        for _ in range(5):
            mask = gen(target, rng)
            union = np.zeros(GRID, dtype=bool)
            for top, left, h, w in gen.last_blocks:
                assert h * w >= 4 and h < GRID[0] and w < GRID[1]
                assert 0.3 / 2 <= h / w <= 2 / 0.3  # log-uniform aspect, up to rounding
                union[top : top + h, left : left + w] = True
            np.testing.assert_array_equal(mask, union)
            assert mask.sum() <= target


def test_never_more_than_max_mask_ratio() -> None:
    gen = BlockMaskGenerator(GRID, max_mask_ratio=0.5)
    rng = np.random.default_rng(1)
    assert gen(N, rng).sum() <= N // 2
    masks = sample_masks(8, GRID, gen, rng, ratio_min_max=(0.4, 0.9))
    assert masks.sum(1).max() <= N // 2
    small = BlockMaskGenerator((8, 8), max_mask_ratio=0.25)
    assert small(64, rng).sum() <= 16


def test_deterministic_for_a_seeded_rng() -> None:
    gen = BlockMaskGenerator(GRID)
    a = sample_masks(8, GRID, gen, np.random.default_rng(123))
    b = sample_masks(8, GRID, gen, np.random.default_rng(123))
    c = sample_masks(8, GRID, gen, np.random.default_rng(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_grid_mismatch_and_no_crops() -> None:
    gen = BlockMaskGenerator(GRID)
    with pytest.raises(ValueError, match="grid"):
        sample_masks(4, (8, 8), gen, np.random.default_rng(0))
    assert sample_masks(0, GRID, gen, np.random.default_rng(0)).shape == (0, N)
