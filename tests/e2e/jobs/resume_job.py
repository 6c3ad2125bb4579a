"""A tiny real pretraining run used by test_resume.py (run as a separate process to be killed)."""

import json
import sys

import torch

from dinoflow.config import PretrainConfig
from dinoflow.data import channel_stats, load_splits
from dinoflow.training import pretrain

TINY = {
    "crops": {"global_size": 16, "local_size": 8, "n_local": 2},
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                 "drop_path_rate": 0.2},  # drop path: the RNG state must survive the kill
    "head": {"n_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "optim": {"warmup_epochs": 1, "teacher_temp_warmup_epochs": 1, "freeze_last_layer_epochs": 1},
    "train": {"epochs": 3, "batch_size": 16, "num_workers": 0, "checkpoint_every_steps": 4,
              "log_every_steps": 2, "progress": False,
              "precision": "fp32"},  # pinned: runs compared bit for bit train in one precision
}


def main(run_dir: str, overrides: str = "{}") -> None:
    """``overrides``: JSON of whole config sections added to TINY (e.g. ``{"gram": {...}}``)."""
    torch.set_num_threads(1)
    cfg = PretrainConfig.model_validate(
        {**TINY, **json.loads(overrides), "train": {**TINY["train"], "run_dir": run_dir}})
    train = load_splits(allow_download=False)["train"].subset(range(128))
    mean, std = channel_stats(train)
    result = pretrain(cfg, train, mean, std)
    print(json.dumps({"steps": result.steps, "resumed_from_step": result.resumed_from_step}))


if __name__ == "__main__":
    main(*sys.argv[1:])
