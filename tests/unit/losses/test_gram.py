"""Gram anchoring (DINOv3): the loss by hand, the Gram teacher's copies, a run with it on.

Resume equality with it on is in test_resume.py (the same SIGKILL test, parametrized)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinoflow.config import ConfigError, PretrainConfig, validate
from dinoflow.data import channel_stats, load_splits
from dinoflow.losses.gram import GramLoss
from dinoflow.methods import DINOv2
from dinoflow.training import pretrain, run_fingerprint
from dinoflow.training.plan import schedules_for

TINY = {
    "crops": {"global_size": 16, "local_size": 8, "n_local": 2},
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
    "head": {"n_prototypes": 32, "hidden_dim": 16, "bottleneck_dim": 8},
    "optim": {"warmup_epochs": 1, "teacher_temp_warmup_epochs": 1, "freeze_last_layer_epochs": 1},
    "train": {"epochs": 2, "steps_per_epoch": 6, "batch_size": 8, "num_workers": 0,
              "precision": "fp32", "log_every_steps": 1, "progress": False},
}  # fmt: skip


def _cfg(tmp_path, **gram) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {**TINY, "gram": gram, "train": {**TINY["train"], "run_dir": str(tmp_path)}}
    )


def test_gram_loss_by_hand() -> None:
    # one image, 3 patches, 2 dims: cosines written out
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]]])
    r = 1 / math.sqrt(2)
    s_cos = [[1, 0, r], [0, 1, r], [r, r, 1]]
    t_cos = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    expected = sum((s_cos[i][j] - t_cos[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    loss = GramLoss()(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # per image: a second image with the same patches doubles nothing
    both = GramLoss()(student.repeat(2, 1, 1), teacher.repeat(2, 1, 1))
    assert both.item() == pytest.approx(expected, rel=1e-6)
    # scale-free (cosines), zero against itself, no gradient into the teacher
    assert GramLoss()(5 * student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert GramLoss()(student, student).item() == pytest.approx(0.0, abs=1e-7)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    GramLoss()(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="differ"):
        GramLoss()(student, teacher[:, :2])


def test_gram_settings_are_validated_and_off_leaves_the_fingerprint(tmp_path) -> None:
    with pytest.raises(ConfigError, match="gram.weight"):
        validate(PretrainConfig, {"gram": {"weight": -1}}, "pretrain")
    with pytest.raises(ConfigError, match="gram.update_every"):
        validate(PretrainConfig, {"gram": {"weight": 1, "update_every": 0}}, "pretrain")
    off, on = _cfg(tmp_path), _cfg(tmp_path, weight=0.5)
    plain = PretrainConfig.model_validate({**TINY, "train": {**TINY["train"], "run_dir": str(tmp_path)}})
    assert run_fingerprint(off, 100) == run_fingerprint(plain, 100)  # off: as without the option
    assert run_fingerprint(on, 100) != run_fingerprint(off, 100)


def test_the_gram_teacher_is_the_ema_copied_at_the_steps_asked(tmp_path) -> None:
    cfg = _cfg(tmp_path, weight=1.0, first_update_step=3, update_every=4)
    method = DINOv2(cfg, 1)
    assert method.loss_names == ("dino", "ibot", "koleo", "gram")
    assert set(method.parts()) == {"student", "teacher", "dino_loss", "ibot_loss", "gram_teacher"}
    schedules, _ = schedules_for(cfg, 12, 6, 8)
    copies = []
    for step in range(12):
        with torch.no_grad():  # the student moves as an optimizer would
            for p in method.student.parameters():
                p.add_(0.01 * (step + 1))
        before = {k: v.clone() for k, v in method.gram_teacher.state_dict().items()}
        method.update_teacher(step, schedules)
        after = method.gram_teacher.state_dict()
        if any(not torch.equal(before[k], after[k]) for k in after):
            copies.append(step + 1)  # the step that first sees the new copy
            ema = method.teacher.backbone.state_dict()
            assert all(torch.equal(after[k], ema[k]) for k in after)
    assert copies == [3, 7, 11]
    assert [method.gram_on(s) for s in (0, 2, 3, 11)] == [False, False, True, True]


@pytest.fixture(scope="module")
def split():
    train = load_splits(allow_download=False)["train"].subset(range(64))
    return train, *channel_stats(train)


def test_a_run_with_gram_anchoring_logs_the_term_from_its_first_copy(tmp_path, split) -> None:
    train, mean, std = split
    summary = pretrain(_cfg(tmp_path, weight=1.0, first_update_step=5, update_every=3), train, mean, std)
    rows = json.loads((tmp_path / "history.json").read_text())
    gram = {r["step"]: r["loss/gram"] for r in rows if "loss/gram" in r}
    assert sorted(gram) == list(range(1, 13))
    assert all(gram[s] == 0.0 for s in range(1, 6))  # steps 0-4: no Gram teacher yet
    assert all(0.0 < gram[s] < 1.0 for s in range(6, 13))  # cosines differ: a squared difference
    # the total is the weighted sum of the terms, the Gram term with it
    last = rows[-1]
    w = PretrainConfig().loss
    total = (w.dino_weight * last["loss/dino"] + w.ibot_weight * last["loss/ibot"]
             + w.koleo_weight * last["loss/koleo"] + last["loss/gram"])  # fmt: skip
    assert last["loss/total"] == pytest.approx(total, rel=1e-5)
    assert summary.steps == 12
