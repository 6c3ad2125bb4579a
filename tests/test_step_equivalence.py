"""Guard for performance work: a fixed-seed smoke training must give the recorded loss curve.

``pretrain`` runs end to end (data loader, multi-crop augmentation, masking, train_step, AdamW,
EMA, centers) on a tiny synthetic uint8 dataset for ``N_STEPS`` steps, logging every step. The
per-step losses must equal ``REFERENCE`` (recorded from the unoptimised code) within float
tolerance: an optimisation may change the summation order, never the computation.

Re-record (only after an intended change of the method):
``DINOFLOW_RECORD=1 python -m pytest tests/test_step_equivalence.py -s``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.train import pretrain

N_STEPS = 6
TERMS = ("loss/dino", "loss/ibot", "loss/koleo", "loss/total")

# loss/dino, loss/ibot, loss/koleo, loss/total for steps 1..N_STEPS
REFERENCE: list[tuple[float, float, float, float]] = [
    (1.046759, 3.0936031, 6.763896, 4.816752),
    (1.6704761, 3.1391037, 7.0132513, 5.5109048),
    (0.3004163, 2.9715872, 10.7718134, 4.349185),
    (0.5034656, 2.7697878, 9.9414215, 4.2673955),
    (0.8951955, 2.5158222, 9.7254009, 4.3835578),
    (1.2737042, 2.823395, 9.2342873, 5.0205278),
]

# fp32 with a different summation order drifts by ~1e-6 relative per step; a semantic change
# (a wrong mask, a missing term, a different center lag) moves the curve by >1e-3 at once.
RTOL, ATOL = 2e-4, 2e-5


def tiny_config(run_dir: str) -> PretrainConfig:
    """Smoke sizes with every feature of the step switched on (drop-path, clipping, masking)."""
    return PretrainConfig.model_validate({
        "crops": {"global_size": 28, "local_size": 12, "n_local": 2},
        "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 32, "depth": 2,
                     "num_heads": 2, "drop_path_rate": 0.1},
        "head": {"n_prototypes": 64, "hidden_dim": 48, "bottleneck_dim": 16},
        "optim": {"warmup_epochs": 1, "teacher_temp_warmup_epochs": 1,
                  "freeze_last_layer_epochs": 0.2},
        "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 8, "seed": 0,
                  "device": "cpu", "num_workers": 0, "run_dir": run_dir, "resume": False,
                  "log_every_steps": 1, "checkpoint_every_steps": 1000, "progress": False},
    })  # fmt: skip


def tiny_split(n: int = 32) -> Split:
    """n random uint8 28x28 grayscale images (a fixed generator: the same on every machine)."""
    rng = np.random.default_rng(1234)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return Split(ids=[f"train/{i:06d}" for i in range(n)], labels=np.zeros(n, dtype=np.int64),
                 class_names=["x"], channels=1, images=images, name="train")


def run_curve(run_dir: str) -> list[tuple[float, ...]]:
    """Per-step (dino, ibot, koleo, total) of the fixed-seed smoke run."""
    torch.manual_seed(0)
    result = pretrain(tiny_config(run_dir), tiny_split(), mean=[0.5], std=[0.25])
    history = json.loads((Path(result.run_dir) / "history.json").read_text())
    rows = [h for h in history if "loss/total" in h]
    assert [h["step"] for h in rows] == list(range(1, N_STEPS + 1))
    return [tuple(h[t] for t in TERMS) for h in rows]


def test_loss_curve_matches_the_recorded_reference(tmp_path) -> None:
    curve = run_curve(str(tmp_path / "run"))
    if os.environ.get("DINOFLOW_RECORD"):
        print("REFERENCE = [\n" + "".join(f"    {tuple(round(v, 7) for v in row)},\n"
                                         for row in curve) + "]")
        pytest.skip("recorded; paste REFERENCE into the test")
    assert len(curve) == len(REFERENCE) == N_STEPS
    got, want = np.array(curve), np.array(REFERENCE)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # total = dino + ibot + 0.1 * koleo (the configured weights), step by step
    np.testing.assert_allclose(got[:, 3], got[:, 0] + got[:, 1] + 0.1 * got[:, 2], rtol=1e-5)


def test_the_curve_is_deterministic_and_moves(tmp_path) -> None:
    """Two runs agree exactly (the guard is meaningful) and training changes the losses."""
    a = np.array(run_curve(str(tmp_path / "a")))
    b = np.array(run_curve(str(tmp_path / "b")))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.diff(a[:, 3])).max() > 1e-3
