"""A run's plan, decided before it trains: its length, its schedules, its fingerprint and its
precision."""

from __future__ import annotations

import torch

from dinoflow.config import PretrainConfig, fingerprint
from dinoflow.precision import auto_precision, autocast
from dinoflow.schedules import Schedules, build_schedules, scaled_lr

# Settings that do not change what a run computes (so a resumed run may differ in them).
NOT_IN_FINGERPRINT = {
    "progress",
    "resume",
    "log_every_steps",
    "checkpoint_every_steps",
    "compile",
    "num_workers",
    "pin_memory",
    "threads",
    "knn_every_epochs",
    "run_dir",
    "keep_checkpoints",
    "max_unreadable_fraction",
}


def peak_lr(cfg: PretrainConfig, global_batch: int) -> float:
    """The schedule's peak lr: ``base_lr``, scaled by sqrt(global_batch / 1024) under ``sqrt``."""
    o = cfg.optim
    return scaled_lr(o.base_lr, global_batch) if o.lr_scaling == "sqrt" else o.base_lr


def total_steps_for(cfg: PretrainConfig, n_images: int, world_size: int) -> tuple[int, int]:
    """(total_steps, steps_per_epoch): real epochs unless train.steps_per_epoch is set."""
    t = cfg.train
    steps_per_epoch = t.steps_per_epoch or max(1, n_images // (t.batch_size * world_size))
    return max(1, int(round(t.epochs * steps_per_epoch))), steps_per_epoch


def schedules_for(
    cfg: PretrainConfig, total_steps: int, steps_per_epoch: int, global_batch: int
) -> tuple[Schedules, list[str]]:
    """Every schedule of a run of ``total_steps`` (and the notes on any warm-up capped)."""
    o = cfg.optim
    return build_schedules(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        base_lr=peak_lr(cfg, global_batch),
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        wd_start=o.weight_decay_start,
        wd_end=o.weight_decay_end,
        momentum_start=o.momentum_teacher_start,
        momentum_end=o.momentum_teacher_end,
        momentum_shape=o.momentum_teacher_shape,
        teacher_temp_start=o.teacher_temp_start,
        teacher_temp_end=o.teacher_temp_end,
        teacher_temp_warmup_epochs=o.teacher_temp_warmup_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        max_warmup_fraction=o.max_warmup_fraction,
        convention=o.schedule_convention,
    )


def run_fingerprint(cfg: PretrainConfig, n_images: int, world_size: int = 1) -> str:
    """Hash of what the run computes. The global batch (not the per-process one) enters it, so
    a checkpoint written by N processes resumes in M processes with the same global batch.
    Options that are off (Gram anchoring at weight 0) leave it as it is without them."""
    d = cfg.model_dump(mode="json")
    d["train"] = {k: v for k, v in d["train"].items() if k not in NOT_IN_FINGERPRINT}
    d["train"]["batch_size"] = cfg.train.batch_size * world_size
    d.pop("launcher")
    if not cfg.gram.weight:
        d.pop("gram")
    return fingerprint({"cfg": d, "n_images": n_images})


def precision_choice(cfg: PretrainConfig, device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``train.precision``. auto (``dinoflow.precision.auto_precision``):
    bf16 autocast on CUDA; on a CPU, bf16 when it has bf16 matrix units and one MLP layer at the
    global crops' tokens x batch is large enough for bf16 to pay, else fp32. No timing."""
    want = cfg.train.precision
    if want != "auto":
        return want, f"train.precision={want}"
    tokens = (cfg.crops.global_size // cfg.backbone.patch_size) ** 2 + 1
    dim = cfg.backbone.embed_dim or 384
    return auto_precision(
        device, min(4096, 2 * cfg.train.batch_size * tokens), dim, int(dim * cfg.backbone.mlp_ratio)
    )


def resolve_precision(cfg: PretrainConfig, device: torch.device) -> str:
    return precision_choice(cfg, device)[0]


def autocast_for(cfg: PretrainConfig, device: torch.device):
    """The autocast context of the resolved precision (fp32 master weights either way)."""
    return autocast(resolve_precision(cfg, device), device)
