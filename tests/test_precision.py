"""``train.precision: auto``: bf16 autocast where the CPU has bf16 matrix units and bf16 is
measured faster for the run's shapes, fp32 elsewhere; the choice is logged and in the summary."""

from __future__ import annotations

import torch

from dinoflow.config import PretrainConfig
from dinoflow.training import step as step_mod
from dinoflow.training.step import precision_choice

CPU = torch.device("cpu")


def cfg(**train) -> PretrainConfig:
    return PretrainConfig.model_validate({"crops": {"global_size": 28, "local_size": 12},
                                          "backbone": {"arch": "custom", "patch_size": 4,
                                                       "embed_dim": 128, "depth": 6, "num_heads": 4},
                                          "train": train})


def test_auto_is_fp32_on_a_cpu_without_bf16_units(monkeypatch) -> None:
    monkeypatch.setattr(step_mod, "cpu_bf16_units", lambda: False)
    precision, why = precision_choice(cfg(), CPU)
    assert precision == "fp32" and "without bf16 matrix units" in why


def test_auto_is_bf16_on_a_cpu_with_units_where_measured_faster(monkeypatch) -> None:
    """The choice on the other kind of CPU (Intel AMX): the capability is what lscpu reports
    there; the measured speedup decides (1.4x was measured for conf/base's step on AMX)."""
    monkeypatch.setattr(step_mod, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(step_mod, "bf16_speedup", lambda rows, dim, hidden: 1.4)
    precision, why = precision_choice(cfg(), CPU)
    assert precision == "bf16" and "1.40x" in why
    monkeypatch.setattr(step_mod, "bf16_speedup", lambda rows, dim, hidden: 0.9)
    assert precision_choice(cfg(), CPU)[0] == "fp32"  # units, but slower for these shapes


def test_explicit_precision_and_cuda() -> None:
    assert precision_choice(cfg(precision="bf16"), CPU)[0] == "bf16"
    assert precision_choice(cfg(precision="fp32"), torch.device("cuda", 0))[0] == "fp32"
    assert precision_choice(cfg(), torch.device("cuda", 0))[0] == "bf16"


def test_this_machine_is_reported_as_it_is() -> None:
    """The real capability check of this CPU agrees with torch's own view of it."""
    from pathlib import Path

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert step_mod.cpu_bf16_units() == bool(flags & {"amx_bf16", "avx512_bf16"})


def test_bf16_speedup_is_a_measurement() -> None:
    ratio = step_mod.bf16_speedup(64, 32, 64, repeats=2)
    assert ratio > 0 and ratio == step_mod.bf16_speedup(64, 32, 64, repeats=2)  # cached
    if not step_mod.cpu_bf16_units():
        assert ratio < 1.1  # emulated bf16 is not faster (AVX2 only: ~100x slower at scale)


def test_the_summary_says_the_precision(tmp_path) -> None:
    import numpy as np

    from dinoflow.data import Split
    from dinoflow.training import pretrain

    c = PretrainConfig.model_validate({
        "crops": {"global_size": 16, "local_size": 8, "n_local": 1},
        "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "head": {"n_prototypes": 16, "hidden_dim": 16, "bottleneck_dim": 8},
        "train": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "run_dir": str(tmp_path),
                  "progress": False},
    })  # fmt: skip
    rng = np.random.default_rng(0)
    split = Split(ids=[str(i) for i in range(8)], labels=np.zeros(8, np.int64), class_names=["a"],
                  channels=1, images=rng.integers(0, 256, (8, 16, 16), dtype=np.uint8))
    summary = pretrain(c, split, [0.5], [0.25])
    expected = "bf16" if step_mod.cpu_bf16_units() and step_mod.bf16_speedup(
        2 * 4 * 17, 16, 64) > 1.1 else "fp32"
    assert summary.precision == precision_choice(c, CPU)[0] == expected


def test_the_bf16_measurement_leaves_the_random_stream_alone() -> None:
    """A resumed process measures again after restoring the RNG state: drop-path would then draw
    other numbers than the uninterrupted run (exact resume broke on a bf16 CPU)."""
    step_mod.bf16_speedup.cache_clear()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    step_mod.bf16_speedup(16, 8, 8, repeats=1)
    assert torch.equal(torch.rand(4), expected)


def test_a_resumed_run_keeps_the_precision_its_checkpoint_was_trained_in(monkeypatch) -> None:
    from types import SimpleNamespace

    from dinoflow.training import loop

    monkeypatch.setattr(loop, "precision_choice", lambda c, d: ("fp32", "auto measured 1.05x"))
    run = SimpleNamespace(precision=None)
    pinned, why = loop.pin_precision(run, cfg(), "bf16", CPU)
    assert pinned.train.precision == run.precision == "bf16" and "checkpoint" in why
    fresh, _ = loop.pin_precision(run, cfg(), None, CPU)
    assert fresh.train.precision == run.precision == "fp32"
