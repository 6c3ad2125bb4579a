"""``train.precision: auto``: bf16 autocast where the CPU has bf16 matrix units and the run's
shapes are large enough, fp32 elsewhere; never a timing; logged and in the summary."""

from __future__ import annotations

import torch

from dinoflow import precision as prec  # the rule train.precision and evaluation.precision share
from dinoflow.config import PretrainConfig
from dinoflow.training.plan import precision_choice

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


def test_auto_on_a_cpu_with_units_is_a_rule_of_the_shapes(monkeypatch) -> None:
    """The choice on a CPU with bf16 units (Zen 4/5, Intel AMX): bf16 from one MLP layer of
    2^24 multiply-accumulates; conf/base's step (batch 32, 50 tokens, 128 -> 256) is 105M."""
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: True)
    precision, why = precision_choice(cfg(batch_size=32), CPU)
    assert precision == "bf16" and "3200x128 @ 128x512 = 209.7M MACs" in why
    # batch 1: 2 x 50 rows x 128 x 512 = 6.6M MACs, where bf16 measured 1.0-1.3x
    assert precision_choice(cfg(batch_size=1), CPU)[0] == "fp32"
    assert prec.auto_precision(CPU, 2**10, 2**7, 2**7) == (
        "bf16", "auto on a CPU with bf16 units: bf16 (one MLP layer 1024x128 @ 128x128 "
        "= 16.8M MACs >= 16.8M)")
    assert prec.auto_precision(CPU, 2**10 - 1, 2**7, 2**7)[0] == "fp32"


def test_auto_takes_no_timing_and_repeats_whatever_the_load(monkeypatch) -> None:
    """Two resolutions of the same run never differ: no clock is read (a timing taken at run
    start once gave fp32 in one run and bf16 in the next, and the weights differed)."""
    import threading
    import time

    def no_clock():
        raise AssertionError("the precision rule read a clock")

    answers = [precision_choice(cfg(batch_size=b), CPU) for b in (1, 8, 32)]
    monkeypatch.setattr(time, "perf_counter", no_clock)
    monkeypatch.setattr(time, "time", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    assert [precision_choice(cfg(batch_size=b), CPU) for b in (1, 8, 32)] == answers
    stop = threading.Event()

    def busy() -> None:  # load the cores with matmuls while the choice is made again
        a = torch.randn(256, 256)
        while not stop.is_set():
            a @ a

    hogs = [threading.Thread(target=busy) for _ in range(2)]
    for t in hogs:
        t.start()
    try:
        loaded = [precision_choice(cfg(batch_size=b), CPU) for b in (1, 8, 32)]
    finally:
        stop.set()
        for t in hogs:
            t.join()
    assert loaded == answers


def test_explicit_precision_and_cuda() -> None:
    assert precision_choice(cfg(precision="bf16"), CPU)[0] == "bf16"
    assert precision_choice(cfg(precision="fp32"), torch.device("cuda", 0))[0] == "fp32"
    assert precision_choice(cfg(), torch.device("cuda", 0))[0] == "bf16"


def test_this_machine_is_reported_as_it_is() -> None:
    """The real capability check of this CPU agrees with torch's own view of it."""
    from pathlib import Path

    flags = set(Path("/proc/cpuinfo").read_text().split())
    usable = torch.backends.cpu.get_cpu_capability() == "AVX512"  # ATEN_CPU_CAPABILITY may cap it
    assert prec.cpu_bf16_units() == (usable and bool(flags & {"amx_bf16", "avx512_bf16"}))


def test_kernels_capped_at_avx2_mean_fp32(monkeypatch) -> None:
    """ATEN_CPU_CAPABILITY=avx2 (an AVX2-only machine, or one told to act as one): bf16 matmuls
    would be emulated, so ``auto`` trains in fp32 even on a CPU with bf16 units."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not prec.cpu_bf16_units()
    assert precision_choice(cfg(), CPU)[0] == "fp32"


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
    # 2 x 4 x 17 rows x 16 x 64: 0.07M MACs, fp32 on every CPU
    expected = "fp32"
    assert summary.precision == precision_choice(c, CPU)[0] == expected


def test_choosing_leaves_the_random_stream_alone() -> None:
    """A resumed process resolves again after restoring the RNG state: drop-path must then
    draw the same numbers as the uninterrupted run."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    precision_choice(cfg(), CPU)
    assert torch.equal(torch.rand(4), expected)


def test_a_resumed_run_keeps_the_precision_its_checkpoint_was_trained_in(monkeypatch) -> None:
    from dinoflow.methods import DINOv2
    from dinoflow.training import Trainer, trainer

    monkeypatch.setattr(trainer, "precision_choice", lambda c, d: ("fp32", "auto: no bf16 units"))

    def pinned(restored: str | None) -> tuple[Trainer, str]:
        run = Trainer(DINOv2(cfg(), 1), cfg(), 64, 1, CPU)
        run.state.precision = restored  # as a checkpoint restores it
        return run, run.pin_precision()[1]

    resumed, why = pinned("bf16")
    assert resumed.cfg.train.precision == resumed.state.precision == "bf16" and "checkpoint" in why
    fresh, _ = pinned(None)
    assert fresh.cfg.train.precision == fresh.state.precision == "fp32"


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_precision_follows_the_same_rule(monkeypatch, tiny_backbone) -> None:
    from dinoflow.evaluation.report import EvalSettings, evaluation_precision

    backbone = tiny_backbone(dim=32)
    settings = EvalSettings(image_size=16, batch_size=64)
    assert settings.precision == "auto"
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: False)
    precision, why = evaluation_precision(settings, backbone)
    assert precision == "fp32" and "without bf16 matrix units" in why
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: True)
    # a feature batch's tokens x D x 4D: 1088 x 32 x 128 = 4.5M MACs: too small for bf16
    precision, why = evaluation_precision(settings, backbone)
    assert precision == "fp32" and "1088x32 @ 32x128" in why
    wide = tiny_backbone(dim=128)  # 1088 x 128 x 512 = 71M MACs
    assert evaluation_precision(settings, wide)[0] == "bf16"
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
