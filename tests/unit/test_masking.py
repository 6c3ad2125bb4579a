"""iBOT block masking (docs/method.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.masking import BlockMaskGenerator, masked_count_bounds, sample_masks

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


def test_the_masked_count_bounds() -> None:
    # 4 crops, 2 masked, bands linspace(0.1, 0.5, 3) = [0.1, 0.3, 0.5] (float32):
    # int(49 * 0.5) = 24 and int(49 * 0.3000000119) = 14
    assert masked_count_bounds(4, 49, 0.5, (0.1, 0.5)) == (24, 14)
    assert masked_count_bounds(5, 49, 0.5, (0.1, 0.5)) == (24, 14)
    assert masked_count_bounds(3, 49, 0.0, (0.1, 0.5)) == ()
    for grid in ((7, 7), GRID):
        gen, n = BlockMaskGenerator(grid), grid[0] * grid[1]
        bounds = masked_count_bounds(64, n)
        for seed in range(30):
            counts = sample_masks(64, grid, gen, np.random.default_rng(seed)).sum(1).numpy()
            top = np.sort(counts)[::-1][: len(bounds)]
            assert (top <= bounds).all(), (grid, seed)  # the k-th largest under the k-th bound


def test_step_masks_bound_each_rank() -> None:
    from dinoflow.config import PretrainConfig
    from dinoflow.training import StepMasks

    cfg = PretrainConfig.model_validate({"crops": {"global_size": 28, "local_size": 12}, "backbone": {
        "arch": "custom", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}})
    one = StepMasks(cfg, 0, 1)
    assert one.max_masked(16) == sum(masked_count_bounds(32, 49))
    for world in (1, 2, 4):
        ranks = [StepMasks(cfg, r, world) for r in range(world)]
        bound = ranks[0].max_masked(8)
        counts = [int(m.for_rank(step, 8).sum()) for step in range(40) for m in ranks]
        assert max(counts) <= bound
        if world == 1:  # one process: the bound is near every step's count (~10% padding)
            assert min(counts) >= 0.85 * bound, (min(counts), bound)


def test_masks_are_shuffled_over_crops() -> None:
    gen = BlockMaskGenerator(GRID)
    masked_rows = {
        tuple(np.flatnonzero(sample_masks(8, GRID, gen, np.random.default_rng(s)).sum(1).numpy()))
        for s in range(10)
    }
    assert len(masked_rows) > 1  # not always the same crops (e.g. not the first half)


@pytest.mark.parametrize("reject_small_blocks", [False, True])
def test_blocks_form_the_mask(reject_small_blocks: bool) -> None:
    gen = BlockMaskGenerator(GRID, reject_small_blocks=reject_small_blocks)
    rng = np.random.default_rng(0)
    for target in (2, 4, 10, 25, 60, 128):
        for _ in range(5):
            mask = gen(target, rng)
            union = np.zeros(GRID, dtype=bool)
            for top, left, h, w in gen.last_blocks:
                assert h < GRID[0] and w < GRID[1]
                assert h * w >= (4 if reject_small_blocks else 1)
                assert 0.3 / 2 <= h / w <= 2 / 0.3  # log-uniform aspect, up to rounding
                union[top : top + h, left : left + w] = True
            np.testing.assert_array_equal(mask, union)
            assert mask.sum() <= target


def test_small_blocks_fill_the_last_patches_unless_rejected() -> None:
    """dinov2's rule: once fewer than min_num_patches are still wanted, smaller blocks fill
    them, so the requested count is hit far more often than with reject_small_blocks."""
    rng = np.random.default_rng(3)
    targets = rng.integers(26, 129, size=400)  # the 16x16 counts of ratios 0.1..0.5
    hits, small = {}, {}
    for reject in (False, True):
        gen = BlockMaskGenerator(GRID, reject_small_blocks=reject)
        got = []
        n_small = 0
        for t in targets:
            got.append(int(gen(int(t), rng).sum()))
            n_small += sum(h * w < 4 for _, _, h, w in gen.last_blocks)
        hits[reject] = float(np.mean(np.array(got) == targets))
        small[reject] = n_small
    assert small[True] == 0 and small[False] > 100
    assert hits[False] > 0.85 and hits[True] < 0.5, hits


def test_blocks_never_exceed_max_mask_ratio() -> None:
    """max_mask_ratio bounds each block (the reference's max_num_patches); the total is bounded
    by the requested count (ratio_max <= max_mask_ratio in every profile)."""
    small = BlockMaskGenerator((8, 8), max_mask_ratio=0.25)
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = small(64, rng)
        top, left, h, w = small.last_blocks[0]
        assert h * w <= 16  # the first block overlaps nothing: all of it is new
        assert mask.sum() <= 64
    gen = BlockMaskGenerator(GRID, max_mask_ratio=0.5)
    masks = sample_masks(8, GRID, gen, rng)  # ratios 0.1..0.5
    assert masks.sum(1).max() <= N // 2
    # reject_small_blocks also caps the total at max_mask_ratio
    rejecting = BlockMaskGenerator((8, 8), max_mask_ratio=0.25, reject_small_blocks=True)
    assert rejecting(64, rng).sum() <= 16


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
