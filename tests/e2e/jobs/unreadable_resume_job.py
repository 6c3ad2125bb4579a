"""A tiny pretraining run on a folder of photos, some of them unreadable: used by
test_unreadable_training.py in process, and as a separate process to be killed.

``python tests/e2e/jobs/unreadable_resume_job.py RUN_DIR SPLIT_JSON``: SPLIT_JSON holds the folder and
the item ids of the split as it was built, before some of its files broke.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.training import pretrain

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]  # fixed: nothing reads the files before training


def tiny_cfg(run_dir: str | Path, **train: Any) -> PretrainConfig:
    """A smoke-sized ViT on 16 px crops, 5 steps per epoch of the 40 photos, in fp32 (runs are
    compared bit for bit); drop path on, so the RNG state must survive a kill."""
    return PretrainConfig.model_validate(
        {
            "crops": {"global_size": 16, "local_size": 8, "n_local": 2},
            "backbone": {
                "arch": "custom",
                "patch_size": 4,
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 2,
                "drop_path_rate": 0.1,
            },
            "head": {"n_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16},
            "optim": {
                "warmup_epochs": 1,
                "teacher_temp_warmup_epochs": 1,
                "freeze_last_layer_epochs": 1,
            },
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "device": "cpu",
                "precision": "fp32",
                "num_workers": 0,
                "checkpoint_every_steps": 5,
                "log_every_steps": 2,
                "progress": False,
                "max_unreadable_fraction": 0.1,
                "run_dir": str(run_dir),
                **train,
            },
        }
    )


def folder_split(root: str | Path, ids: list[str]) -> Split:
    """The train split of an unlabelled folder, as ``load_splits`` lists it: RGB, by path."""
    return Split(
        ids=ids,
        labels=np.full(len(ids), -1, dtype=np.int64),
        class_names=[],
        channels=3,
        paths=[Path(root) / item for item in ids],
        name="train",
    )


def train(run_dir: str | Path, root: str | Path, ids: list[str]) -> dict[str, Any]:
    """30 steps (time to be killed after a checkpoint) -> what the test compares."""
    torch.set_num_threads(1)
    result = pretrain(tiny_cfg(run_dir, epochs=6), folder_split(root, ids), MEAN, STD)
    return {
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "unreadable_files": result.unreadable_files,
    }


if __name__ == "__main__":
    described = json.loads(Path(sys.argv[2]).read_text())
    print(json.dumps(train(sys.argv[1], described["root"], described["ids"])))
