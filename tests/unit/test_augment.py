"""MultiCropAugmentation (against torchvision's own per-crop ops) and EvalTransform."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from dinoflow.augment import (
    CropParams,
    EvalTransform,
    MultiCropAugmentation,
    effective_blur_kernel,
)

QUIET = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


@pytest.mark.parametrize("c", [1, 3])
def test_shapes_dtypes_all_ops_on(c: int) -> None:
    aug = MultiCropAugmentation(
        global_size=28,
        local_size=12,
        n_local=3,
        mean=(0.5,) * c,
        std=(0.25,) * c,
        jitter_p=1.0,
        grayscale_p=1.0,
        solarize_p=1.0,
        blur_p=(1.0, 1.0, 1.0),
    )
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (c, 40, 32), dtype=torch.uint8, generator=g)
    out = aug(img, generator=g)
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    for t in out["global_crops"]:
        assert t.shape == (c, 28, 28) and t.dtype == torch.float32
    for t in out["local_crops"]:
        assert t.shape == (c, 12, 12) and t.dtype == torch.float32
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25  # normalised range of [0, 1] pixels
    allc = torch.cat([t.flatten() for t in out["global_crops"] + out["local_crops"]])
    assert allc.min() >= lo - 1e-6 and allc.max() <= hi + 1e-6
    if c == 3:  # grayscale p=1 on RGB: 3 equal channels
        t = out["local_crops"][0]
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_rejects_bad_input() -> None:
    aug = MultiCropAugmentation(global_size=8, local_size=4, n_local=1)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        MultiCropAugmentation(
            global_size=8, local_size=4, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0)
        )(torch.zeros(1, 16, 16, dtype=torch.uint8))


def _fractions(aug: MultiCropAugmentation, n: int, attr: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(123)
    out = {}
    for kind in ("global1", "global2", "local"):
        ps = [aug.sample_crop_params(28, 28, kind, g) for _ in range(n)]
        vals = [getattr(p, attr) for p in ps]
        out[kind] = sum(v is not None and v is not False for v in vals) / n
    return out


def test_blur_and_solarize_probabilities() -> None:
    n = 3000  # binomial std at p=0.5: 0.009; tolerance 0.035 ~ 4 std
    aug = MultiCropAugmentation(global_size=28, local_size=12)
    blur = _fractions(aug, n, "blur_sigma")
    assert blur["global1"] == 1.0
    assert abs(blur["global2"] - 0.1) < 0.025
    assert abs(blur["local"] - 0.5) < 0.035
    sol = _fractions(aug, n, "solarize")
    assert sol["global1"] == 0.0 and sol["local"] == 0.0
    assert abs(sol["global2"] - 0.2) < 0.03
    bug = _fractions(
        MultiCropAugmentation(global_size=28, local_size=12, reference_blur_bug=True),
        n,
        "blur_sigma",
    )
    assert bug["global1"] == 0.0
    assert abs(bug["global2"] - 0.9) < 0.025
    assert abs(bug["local"] - 0.5) < 0.035
    g = torch.Generator().manual_seed(5)
    sigmas = [aug.sample_crop_params(28, 28, "global1", g).blur_sigma for _ in range(500)]
    assert 0.1 <= min(sigmas) < 0.2 and 1.9 < max(sigmas) <= 2.0


def test_flip_jitter_grayscale_probabilities_and_jitter_ranges() -> None:
    aug = MultiCropAugmentation(global_size=28, local_size=12)
    g = torch.Generator().manual_seed(7)
    ps = [aug.sample_crop_params(28, 28, "local", g) for _ in range(3000)]
    assert abs(sum(p.flip for p in ps) / 3000 - 0.5) < 0.035
    assert abs(sum(p.jitter is not None for p in ps) / 3000 - 0.8) < 0.03
    assert abs(sum(p.grayscale for p in ps) / 3000 - 0.2) < 0.03
    fac = torch.tensor([p.jitter[1] for p in ps if p.jitter is not None])
    lo, hi = fac.min(0).values, fac.max(0).values
    for i, (a, b) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert a <= lo[i] < a + 0.01 and b - 0.01 < hi[i] <= b
    orders = {p.jitter[0] for p in ps if p.jitter is not None}
    assert len(orders) == 24  # every permutation of the 4 ops occurs


def test_crop_boxes_respect_scale_and_ratio() -> None:
    aug = MultiCropAugmentation(global_size=28, local_size=12)
    g = torch.Generator().manual_seed(3)
    for kind, (smin, smax) in (("global1", (0.32, 1.0)), ("local", (0.05, 0.32))):
        for _ in range(300):
            top, left, h, w = aug.sample_crop_params(100, 100, kind, g).box
            assert 0 <= top <= 100 - h and 0 <= left <= 100 - w
            # rounding of w, h to integers moves area/ratio slightly
            assert smin - 0.02 <= h * w / 1e4 <= smax + 0.02
            assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03


def test_blur_kernel_clamped_to_crop() -> None:
    assert effective_blur_kernel(9, 224) == 9
    assert effective_blur_kernel(9, 12) == 9
    assert effective_blur_kernel(9, 8) == 7
    assert effective_blur_kernel(9, 7) == 7
    assert effective_blur_kernel(9, 4) == 3
    with pytest.raises(ValueError):
        effective_blur_kernel(8, 20)
    # an 8 px crop with kernel 9 blurs with kernel 7
    aug = MultiCropAugmentation(global_size=16, local_size=8, n_local=1)
    img = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    p = CropParams((0, 0, 8, 8), False, None, False, 1.5, False)
    got = aug.apply_crops([img], [p], 8)[0]
    assert torch.equal(got, TF.gaussian_blur(img, kernel_size=[7, 7], sigma=[1.5, 1.5]))
    assert not torch.equal(got, img)


def test_solarize_and_flip_by_hand() -> None:
    aug = MultiCropAugmentation(global_size=6, local_size=4, mean=(0.0,), std=(1.0,))
    img = torch.tensor([[[10, 100, 127, 128, 200, 255]] * 6], dtype=torch.uint8)  # (1, 6, 6)
    full = (0, 0, 6, 6)
    sol = aug.apply_crops([img], [CropParams(full, False, None, False, None, True)], 6)[0]
    assert sol[0, 0].tolist() == [10, 100, 127, 127, 55, 0]  # >= 128 -> 255 - x
    flip = aug.apply_crops([img], [CropParams(full, True, None, False, None, False)], 6)[0]
    assert flip[0, 0].tolist() == [255, 200, 128, 127, 100, 10]
    norm = aug.normalize(sol.unsqueeze(0))[0]
    torch.testing.assert_close(norm[0, 0], torch.tensor([10, 100, 127, 127, 55, 0]) / 255.0)


def test_one_channel_jitter_keeps_channel_and_brightness_applies() -> None:
    aug = MultiCropAugmentation(global_size=4, local_size=4, n_local=0, **QUIET)
    img = torch.full((1, 4, 4), 100, dtype=torch.uint8)
    full = (0, 0, 4, 4)
    # brightness 1.2, contrast 1, saturation 0.5 and hue 0.1 (no-ops on one channel)
    p = CropParams(full, False, ((2, 3, 0, 1), (1.2, 1.0, 0.5, 0.1)), True, None, False)
    out = aug.apply_crops([img], [p], 4)[0]
    assert out.shape == (1, 4, 4) and torch.all(out == 120)


def test_quiet_pipeline_is_the_normalised_image() -> None:
    """scale (1, 1) and every op off: each crop is the whole image, normalised by hand."""
    c = 3
    aug = MultiCropAugmentation(
        global_size=10,
        local_size=10,
        n_local=2,
        global_scale=(1, 1),
        local_scale=(1, 1),
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.6, 0.7),
        **QUIET,
    )
    img = torch.randint(0, 256, (c, 10, 10), dtype=torch.uint8, generator=torch.Generator())
    out = aug(img, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    std = torch.tensor([0.5, 0.6, 0.7]).view(3, 1, 1)
    expect = (img.float() / 255 - mean) / std
    for t in out["global_crops"] + out["local_crops"]:
        torch.testing.assert_close(t, expect, rtol=1e-5, atol=1e-5)


def test_generator_determinism() -> None:
    aug = MultiCropAugmentation(global_size=16, local_size=8, n_local=2)
    img = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=torch.Generator())
    a = aug(img, generator=torch.Generator().manual_seed(1))
    b = aug(img, generator=torch.Generator().manual_seed(1))
    c = aug(img, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"], strict=True))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_views_order_and_batch_independence() -> None:
    """views: [view v of image b] at v * B + b; an image's crops are those it gets alone."""
    aug = MultiCropAugmentation(global_size=12, local_size=6, n_local=2, mean=(0.5,), std=(0.2,))
    images = [torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(b))
              for b in range(3)]  # fmt: skip
    gens = [torch.Generator().manual_seed(10 + b) for b in range(3)]
    out = aug.views(images, gens)
    assert out["global_crops"].shape == (6, 1, 12, 12)
    assert out["local_crops"].shape == (6, 1, 6, 6)
    assert out["n_local"] == 2 and out["batch_size"] == 3
    for b, img in enumerate(images):
        alone = aug(img, generator=torch.Generator().manual_seed(10 + b))
        for v in range(2):
            assert torch.equal(out["global_crops"][v * 3 + b], alone["global_crops"][v])
            assert torch.equal(out["local_crops"][v * 3 + b], alone["local_crops"][v])
    empty = MultiCropAugmentation(global_size=12, local_size=6, n_local=0, mean=(0.5,), std=(0.2,)).views(
        images[:1], [torch.Generator()]
    )
    assert empty["local_crops"].shape == (0, 1, 12, 12) and empty["n_local"] == 0
    with pytest.raises(ValueError, match="different numbers of channels"):
        aug.views([images[0], torch.zeros(3, 20, 20, dtype=torch.uint8)], gens[:2])


def _torchvision_crop(aug: MultiCropAugmentation, img: torch.Tensor, p: CropParams, size: int):
    """One crop with torchvision's own per-image ops: what apply_crops must equal."""
    top, left, h, w = p.box
    x = TF.resized_crop(img, top, left, h, w, [size, size],
                        interpolation=InterpolationMode.BICUBIC, antialias=True)  # fmt: skip
    if p.flip:
        x = TF.horizontal_flip(x)
    if p.jitter is not None:
        order, factors = p.jitter
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in order:
            x = ops[op](x, factors[op])
    if p.grayscale and x.shape[-3] == 3:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur_sigma is not None:
        k = effective_blur_kernel(aug.blur_kernel, size)
        x = TF.gaussian_blur(x, kernel_size=[k, k], sigma=[p.blur_sigma, p.blur_sigma])
    if p.solarize:
        x = TF.solarize(x, threshold=aug.solarize_threshold)
    return x


@pytest.mark.parametrize(
    ("c", "sizes"),
    [(1, ((28, 28), (40, 31))), (3, ((20, 20), (24, 18))), (3, ((28, 28), (40, 31)))],
    ids=["grey-matmul-resize", "rgb-matmul-resize", "rgb-per-crop-resize"],
)
def test_batched_crops_equal_torchvisions_per_crop_ops(c: int, sizes) -> None:
    """Every op often (blur and solarisation at 0.5, sigma up to 2 px), images of two sizes in
    one batch (padded to one canvas), up- and down-scaling crops: equal to the last grey level.
    Small sources are resized by the batched matmuls, larger ones by torchvision per crop."""
    aug = MultiCropAugmentation(global_size=28, local_size=12, n_local=4, mean=(0.5,) * c,
                                std=(0.25,) * c, blur_p=(1.0, 0.5, 0.5), blur_sigma=(0.1, 2.0),
                                solarize_p=0.5)  # fmt: skip
    g = torch.Generator().manual_seed(c)
    images = [torch.randint(0, 256, (c, *sizes[i % 2]), dtype=torch.uint8, generator=g)
              for i in range(200)]  # fmt: skip
    for size, kind in ((28, "global2"), (12, "local")):
        params = [aug.sample_crop_params(i.shape[1], i.shape[2], kind, g) for i in images]
        assert sum(p.jitter is not None for p in params) > 100  # the ops really ran
        assert sum(p.blur_sigma is not None for p in params) > 50
        if kind == "global2":
            assert sum(p.solarize for p in params) > 50
        got = aug.apply_crops(images, params, size)
        want = torch.stack([_torchvision_crop(aug, i, p, size) for i, p in zip(images, params, strict=True)])
        assert got.dtype == torch.uint8 and got.shape == (200, c, size, size)
        assert torch.equal(got, want), f"{int((got != want).sum())} pixels differ"


def test_eval_transform() -> None:
    t = EvalTransform(4, mean=(0.5,), std=(0.5,))
    img = torch.arange(16, dtype=torch.uint8).view(1, 4, 4) * 10
    torch.testing.assert_close(t(img), (img.float() / 255 - 0.5) / 0.5)
    big = torch.randint(0, 256, (3, 12, 8), dtype=torch.uint8, generator=torch.Generator())
    t3 = EvalTransform(4, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    assert t3(big).shape == (3, 4, 4)
    assert t3(big.unsqueeze(0).expand(2, -1, -1, -1)).shape == (2, 3, 4, 4)
    # resize 8 -> 4 on the short side, then centre 4x4 of the 6x4 result
    r = TF.resize(big, [4], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expect = (r[:, 1:5].float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.3, 0.4]
    ).view(3, 1, 1)
    torch.testing.assert_close(t3(big), expect)
    assert math.isclose(float(EvalTransform(4, resize_size=6).resize_size), 6.0)
