"""DINOv2 pretraining over named parts (``loop.pretrain`` reads top to bottom over them):

- ``components``: the builder (student, teacher, optimizer, schedules, losses, fingerprint);
- ``data``: multi-crop dataset, per-step batch sampler, iBOT mask collate, the loader;
- ``step``: ``train_step``, one DINOv2 step;
- ``parallel``: DDP and ``torch.compile`` wrapping;
- ``checkpoint``: the ``Checkpointer`` (newest N, fallback, weights-only loading);
- ``metrics``: the ``MetricLogger`` with the progress bar;
- ``online_knn``: the teacher's kNN during training;
- ``export``: the teacher backbone and heads, history files and curves.
"""

from dinoflow.training.components import (
    Components,
    Losses,
    backbone_from_config,
    build_components,
    build_losses,
    build_student,
    peak_lr,
    run_fingerprint,
    total_steps_for,
)
from dinoflow.training.data import (
    MultiCropCollate,
    MultiCropDataset,
    StepBatchSampler,
    StepMasks,
    build_loader,
)
from dinoflow.training.loop import pretrain
from dinoflow.training.parallel import compile_for_training, wrap_for_training
from dinoflow.training.step import autocast_for, resolve_precision, train_step

__all__ = [
    "Components",
    "Losses",
    "MultiCropCollate",
    "MultiCropDataset",
    "StepBatchSampler",
    "StepMasks",
    "autocast_for",
    "backbone_from_config",
    "build_components",
    "build_loader",
    "build_losses",
    "build_student",
    "compile_for_training",
    "peak_lr",
    "pretrain",
    "resolve_precision",
    "run_fingerprint",
    "total_steps_for",
    "train_step",
    "wrap_for_training",
]
