"""A tiny real distillation used by test_distillation.py (a separate process, to be killed):
``python distill_resume_job.py TEACHER_RUN_DIR RUN_DIR``."""

import json
import sys

import torch

from dinoflow.config import DistillationConfig
from dinoflow.data import channel_stats, load_splits
from dinoflow.jobs.distill import load_teacher
from dinoflow.training.distill import distill

CROPS = {"global_size": 16, "local_size": 8, "n_local": 2}
STUDENT = {
    "crops": CROPS,
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2},
    "head": {"hidden_dim": 32, "bottleneck_dim": 16},
    "optim": {"warmup_epochs": 1, "teacher_temp_warmup_epochs": 1, "freeze_last_layer_epochs": 1},
    "train": {"epochs": 3, "batch_size": 16, "num_workers": 0, "checkpoint_every_steps": 4,
              "log_every_steps": 2, "progress": False,
              "precision": "fp32"},  # pinned: runs compared bit for bit train in one precision
}


def main(teacher_dir: str, run_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = DistillationConfig.model_validate({**STUDENT, "teacher": {"source": teacher_dir},
                                             "train": {**STUDENT["train"], "run_dir": run_dir}})
    train = load_splits(allow_download=False)["train"].subset(range(128))
    mean, std = channel_stats(train)
    source = load_teacher(cfg.teacher, train.channels, CROPS["global_size"])
    result = distill(cfg, source.frozen(), train, mean, std, teacher_info=source.info)
    print(json.dumps({"steps": result.steps, "resumed_from_step": result.resumed_from_step}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
