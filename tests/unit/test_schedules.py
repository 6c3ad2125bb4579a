"""Schedules (docs/method.md section 5): values at step 0, at the end of warm-up and at the last step."""

from __future__ import annotations

import numpy as np
import pytest

from dinoflow.schedules import (
    build_schedules,
    cosine_schedule,
    linear_warmup_then_constant,
    scaled_lr,
)

REFERENCE = dict(
    base_lr=0.004,
    min_lr=1e-6,
    warmup_epochs=10,
    wd_start=0.04,
    wd_end=0.4,
    momentum_start=0.992,
    momentum_end=1.0,
    teacher_temp_start=0.04,
    teacher_temp_end=0.07,
    teacher_temp_warmup_epochs=30,
    freeze_last_layer_epochs=1,
)


def test_scaled_lr_square_root_rule() -> None:
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    assert scaled_lr(0.004, 64) == pytest.approx(0.001)


def test_cosine_schedule_endpoints_and_midpoint() -> None:
    """dinov2's CosineScheduler: final + (base - final)(1 + cos(pi i / n)) / 2, i < n, so the
    last step is one step short of final; exact_ends ends at final exactly."""
    m = cosine_schedule(0.992, 1.0, 100)
    assert m.shape == (100,)
    assert m[0] == 0.992 and m[50] == pytest.approx(0.996)  # i / n = 1/2
    assert m[-1] == pytest.approx(1.0 - 0.004 * (1 + np.cos(np.pi * 99 / 100)), abs=1e-15)
    assert 1.0 - m[-1] == pytest.approx(1.974e-6, rel=1e-3)
    assert (np.diff(m) >= 0).all()
    exact = cosine_schedule(0.992, 1.0, 101, convention="exact_ends")
    assert exact[0] == pytest.approx(0.992) and exact[50] == pytest.approx(0.996)
    assert exact[-1] == pytest.approx(1.0)


def test_cosine_schedule_with_warmup_repeats_the_peak() -> None:
    """dinov2: the warm-up linspace(0, 1, 4) reaches the peak at step 3, and the cosine starts
    at the peak again at step 4; exact_ends reaches it once, at step 4."""
    lr = cosine_schedule(1.0, 0.1, 14, warmup_steps=4)
    np.testing.assert_allclose(lr[:5], [0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert lr[-1] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 9 / 10)))
    assert lr.max() == pytest.approx(1.0)
    exact = cosine_schedule(1.0, 0.1, 14, warmup_steps=4, convention="exact_ends")
    np.testing.assert_allclose(exact[:6], [0.0, 0.25, 0.5, 0.75, 1.0, 0.1 + 0.45 * (1 + np.cos(np.pi / 9))])
    assert exact[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="convention"):
        cosine_schedule(1.0, 0.1, 14, convention="dinov3")


def test_linear_warmup_then_constant() -> None:
    np.testing.assert_allclose(
        linear_warmup_then_constant(0.04, 0.07, 3, 6), [0.04, 0.055, 0.07, 0.07, 0.07, 0.07]
    )
    np.testing.assert_allclose(
        linear_warmup_then_constant(0.04, 0.07, 3, 6, convention="exact_ends"),
        [0.04, 0.05, 0.06, 0.07, 0.07, 0.07],
    )
    np.testing.assert_allclose(linear_warmup_then_constant(0.04, 0.07, 0, 2), [0.07, 0.07])


def test_reference_recipe_100_epochs() -> None:
    s, notes = build_schedules(total_steps=1000, steps_per_epoch=10, **REFERENCE)
    assert notes == []
    assert len(s) == 1000
    # lr: linspace(0, peak, 100) over 10 epochs (step 99 is the peak), cosine from step 100
    assert s.lr[0] == 0.0
    assert s.lr[50] == pytest.approx(0.004 * 50 / 99)
    assert s.lr[99] == s.lr[100] == pytest.approx(0.004) and s.lr.max() == pytest.approx(0.004)
    assert s.lr[-1] == pytest.approx(1e-6 + 0.5 * (0.004 - 1e-6) * (1 + np.cos(np.pi * 899 / 900)))
    # wd cosine 0.04 -> 0.4, momentum cosine 0.992 -> 1.0
    assert (s.wd[0], s.wd[-1]) == (pytest.approx(0.04), pytest.approx(0.4, abs=1e-5))
    assert (s.momentum[0], s.momentum[-1]) == (pytest.approx(0.992), pytest.approx(1.0, abs=1e-6))
    # teacher temperature linspace(0.04, 0.07, 300), then 0.07
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[150] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert s.teacher_temp[299] == pytest.approx(0.07)
    assert s.teacher_temp[-1] == pytest.approx(0.07)
    # prototype layer frozen for the first epoch only
    assert s.last_layer_lr_zero.dtype == bool
    assert s.last_layer_lr_zero[:10].all() and not s.last_layer_lr_zero[10:].any()
    # exact_ends: the peak at step 100 only, temperature 0.07 from step 300
    exact, _ = build_schedules(total_steps=1000, steps_per_epoch=10, convention="exact_ends",
                            **REFERENCE)
    assert exact.lr[99] == pytest.approx(0.004 * 0.99) and exact.lr[100] == pytest.approx(0.004)
    assert exact.teacher_temp[299] == pytest.approx(0.0699) and exact.teacher_temp[300] == 0.07


def test_short_run_caps_warmups_and_says_so() -> None:
    s, notes = build_schedules(total_steps=100, steps_per_epoch=10, **REFERENCE)
    assert notes == [
        "lr warm-up capped from 10 to 3 epochs (run has 10)",
        "teacher temperature warm-up capped from 30 to 3 epochs (run has 10)",
    ]
    assert s.lr[29] == s.lr[30] == pytest.approx(0.004)
    assert s.lr[-1] == pytest.approx(1e-6 + 0.5 * (0.004 - 1e-6) * (1 + np.cos(np.pi * 69 / 70)))
    assert s.teacher_temp[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert s.teacher_temp[29] == pytest.approx(0.07) and s.teacher_temp[-1] == pytest.approx(0.07)
    assert s.last_layer_lr_zero.sum() == 10  # 1 epoch <= 30% of the run: not capped


def test_one_epoch_run_caps_the_last_layer_freeze() -> None:
    s, notes = build_schedules(total_steps=20, steps_per_epoch=20, **REFERENCE)
    assert "last-layer freeze capped from 1 to 0.3 epochs (run has 1)" in notes
    assert s.last_layer_lr_zero.sum() == 6
    assert s.teacher_temp[-1] == pytest.approx(0.07)


def test_bad_lengths_raise() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        build_schedules(total_steps=0, steps_per_epoch=10, **REFERENCE)
