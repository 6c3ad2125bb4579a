"""Training any method (``dinoflow.methods``) over named parts:

- ``trainer``: the ``Trainer`` (optimizer, schedules, the step around a method's terms, the loop)
  and ``train``, which builds, resumes, wraps, loops and exports for any method;
- ``loop``: ``pretrain``, the DINOv2 method on the trainer; ``distill``: distillation on it;
- ``plan``: a run's length, schedules, fingerprint and precision;
- ``state``: ``RunState``, the run's own state (step, history, length, precision, files replaced);
- ``data``: multi-crop dataset, per-step batch sampler, iBOT mask collate, the loader;
- ``parallel``: DDP and ``torch.compile`` wrapping;
- ``checkpoint``: the ``Checkpointer`` (newest N, fallback, weights-only loading);
- ``budget``: ``train.time_budget_min``, the run's length chosen once;
- ``metrics``: the ``MetricLogger`` with the progress bar;
- ``online_knn``: the EMA's kNN during training;
- ``history``: the history files and curves.
"""

from dinoflow.methods.dinov2 import (
    DINOv2,
    Losses,
    backbone_from_config,
    build_losses,
    build_student,
)
from dinoflow.training.data import (
    MultiCropCollate,
    MultiCropDataset,
    StepBatchSampler,
    StepMasks,
    build_loader,
    resolve_num_workers,
)
from dinoflow.training.loop import pretrain
from dinoflow.training.parallel import compile_for_training, wrap_for_training
from dinoflow.training.plan import (
    autocast_for,
    peak_lr,
    precision_choice,
    resolve_precision,
    run_fingerprint,
    schedules_for,
    total_steps_for,
)
from dinoflow.training.trainer import Trainer, TrainResult, train

__all__ = [
    "DINOv2",
    "Losses",
    "MultiCropCollate",
    "MultiCropDataset",
    "StepBatchSampler",
    "StepMasks",
    "TrainResult",
    "Trainer",
    "autocast_for",
    "backbone_from_config",
    "build_loader",
    "build_losses",
    "build_student",
    "compile_for_training",
    "peak_lr",
    "precision_choice",
    "pretrain",
    "resolve_num_workers",
    "resolve_precision",
    "run_fingerprint",
    "schedules_for",
    "total_steps_for",
    "train",
    "wrap_for_training",
]
