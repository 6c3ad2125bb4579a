"""``train.precision: auto``: bf16 autocast where the CPU has bf16 matrix units and bf16 is
measured faster for the run's shapes, fp32 elsewhere; the choice is logged and in the summary."""

from __future__ import annotations

import torch

from dinoflow import precision as prec  # the rule train.precision and evaluation.precision share
from dinoflow.config import PretrainConfig
from dinoflow.training.step import precision_choice

CPU = torch.device("cpu")


def cfg(**train) -> PretrainConfig:
    return PretrainConfig.model_validate({"crops": {"global_size": 28, "local_size": 12},
                                          "backbone": {"arch": "custom", "patch_size": 4,
                                                       "embed_dim": 128, "depth": 6, "num_heads": 4},
                                          "train": train})


def test_auto_is_fp32_on_a_cpu_without_bf16_units(monkeypatch) -> None:
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: False)
    precision, why = precision_choice(cfg(), CPU)
    assert precision == "fp32" and "without bf16 matrix units" in why


def test_auto_is_bf16_on_a_cpu_with_units_where_measured_faster(monkeypatch) -> None:
    """The choice on the other kind of CPU (Intel AMX): the capability is what lscpu reports
    there; the measured speedup decides (1.4x was measured for conf/base's step on AMX)."""
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(prec, "bf16_speedup", lambda rows, dim, hidden: 1.4)
    precision, why = precision_choice(cfg(), CPU)
    assert precision == "bf16" and "1.40x" in why
    monkeypatch.setattr(prec, "bf16_speedup", lambda rows, dim, hidden: 0.9)
    assert precision_choice(cfg(), CPU)[0] == "fp32"  # units, but slower for these shapes


def test_explicit_precision_and_cuda() -> None:
    assert precision_choice(cfg(precision="bf16"), CPU)[0] == "bf16"
    assert precision_choice(cfg(precision="fp32"), torch.device("cuda", 0))[0] == "fp32"
    assert precision_choice(cfg(), torch.device("cuda", 0))[0] == "bf16"


def test_this_machine_is_reported_as_it_is() -> None:
    """The real capability check of this CPU agrees with torch's own view of it."""
    from pathlib import Path

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert prec.cpu_bf16_units() == bool(flags & {"amx_bf16", "avx512_bf16"})


def test_bf16_speedup_is_a_measurement() -> None:
    ratio = prec.bf16_speedup(64, 32, 64, repeats=2)
    assert ratio > 0 and ratio == prec.bf16_speedup(64, 32, 64, repeats=2)  # cached
    if not prec.cpu_bf16_units():
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
    expected = "bf16" if prec.cpu_bf16_units() and prec.bf16_speedup(
        2 * 4 * 17, 16, 64) > 1.1 else "fp32"
    assert summary.precision == precision_choice(c, CPU)[0] == expected


def test_the_bf16_measurement_leaves_the_random_stream_alone() -> None:
    """A resumed process measures again after restoring the RNG state: drop-path would then draw
    other numbers than the uninterrupted run (exact resume broke on a bf16 CPU)."""
    prec.bf16_speedup.cache_clear()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    prec.bf16_speedup(16, 8, 8, repeats=1)
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


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_precision_follows_the_same_rule(monkeypatch) -> None:
    from conftest import TinyBackbone

    from dinoflow.evaluation.report import EvalSettings, evaluation_precision

    backbone = TinyBackbone(dim=32)
    settings = EvalSettings(image_size=16, batch_size=64)
    assert settings.precision == "auto"
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: False)
    precision, why = evaluation_precision(settings, backbone)
    assert precision == "fp32" and "without bf16 matrix units" in why
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: True)
    seen = []
    monkeypatch.setattr(prec, "bf16_speedup", lambda rows, dim, hidden: seen.append(
        (rows, dim, hidden)) or 1.6)
    assert evaluation_precision(settings, backbone) == (
        "bf16", "auto on a CPU with bf16 units: bf16 measured 1.60x fp32 here")
    assert seen == [(64 * (16 // 4) ** 2 + 64, 32, 128)]  # a feature batch's tokens, D, 4D
    assert evaluation_precision(EvalSettings(precision="fp32"), backbone)[0] == "fp32"
    assert evaluation_precision(EvalSettings(precision="auto", device="cuda"), backbone)[0] == "bf16"


def test_evaluation_precision_rejects_an_unknown_value() -> None:
    import pytest

    from dinoflow.config import ConfigError
    from dinoflow.jobs.evaluate import evaluation_settings

    with pytest.raises(ConfigError, match=r"evaluation\.precision"):
        evaluation_settings({"precision": "fp16"}, "out", (0.5,), (0.5,), 28)


def test_bf16_features_are_float32_and_close_to_fp32() -> None:
    """Features under bf16 autocast (the evaluation and the online kNN on a bf16 CPU): the
    backbone really ran in bf16 (not bit-equal to fp32), the stored features are float32, and
    they agree with fp32's to bf16's precision and give the same nearest neighbours."""
    import numpy as np

    from dinoflow.evaluation.features import extract_features
    from dinoflow.models.vit import DinoVisionTransformer

    torch.manual_seed(0)
    backbone = DinoVisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=2,
                                     num_heads=2)

    class Images:
        def __init__(self, n: int, seed: int) -> None:
            rng = np.random.default_rng(seed)
            self.labels = np.arange(n) % 4
            self.images = rng.integers(0, 40, (n, 16, 16)).astype(np.uint8)
            for i, c in enumerate(self.labels):  # the class: which quadrant is bright
                r, q = divmod(int(c), 2)
                self.images[i, 8 * r : 8 * r + 8, 8 * q : 8 * q + 8] += 200

        def __len__(self) -> int:
            return len(self.labels)

        def load(self, i: int) -> torch.Tensor:
            return torch.from_numpy(self.images[i]).unsqueeze(0)

    bank, queries = Images(64, 0), Images(32, 1)
    feats = {p: [extract_features(backbone, s, 16, (0.3,), (0.3,), 32, 2, progress=False,
                                  precision=p) for s in (bank, queries)]
             for p in ("fp32", "bf16")}
    f32, b16 = feats["fp32"][0], feats["bf16"][0]
    assert b16.cls_last.dtype == b16.cls_last4.dtype == b16.patch_mean.dtype == torch.float32
    assert not torch.equal(f32.cls_last, b16.cls_last)  # the forward ran in bf16
    cos = torch.nn.functional.cosine_similarity(f32.cls_last, b16.cls_last)
    assert float(cos.min()) > 0.99  # bf16 keeps 8 bits of mantissa: ~0.4 % per op
    def similarities(f) -> torch.Tensor:  # (queries, bank) cosine, as kNN
        bank_x, query_x = (torch.nn.functional.normalize(x.cls_last, dim=1) for x in f)
        return query_x @ bank_x.T

    sim32 = similarities(feats["fp32"])
    pick16 = similarities(feats["bf16"]).argmax(dim=1)
    # bf16's nearest neighbour is fp32's, or one within 1e-3 of it in fp32 (a near-tie)
    gap = sim32.max(dim=1).values - sim32.gather(1, pick16[:, None]).squeeze(1)
    assert float(gap.max()) < 1e-3
    assert float((sim32.argmax(dim=1) == pick16).float().mean()) >= 0.75
