"""Everything one pretraining run is made of, built from its config in one place.

``build_components`` returns the student and its EMA teacher, the optimizer with its parameter
groups, every schedule, the losses and the run's fingerprint. The training loop, the benchmarks,
tuning, the continued-pretraining demo and distillation all build through here, so each of them
runs the step a user trains with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dinoflow.config import BackboneConfig, PretrainConfig, fingerprint
from dinoflow.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from dinoflow.models.heads import DINOHead
from dinoflow.models.ssl import SSLModel, make_teacher
from dinoflow.models.vit import DinoVisionTransformer, build_backbone
from dinoflow.optim import build_optimizer, param_groups
from dinoflow.schedules import Schedules, build_schedules, scaled_lr

log = logging.getLogger(__name__)

# Settings that do not change what a run computes (so a resumed run may differ in them).
NOT_IN_FINGERPRINT = {"progress", "resume", "log_every_steps", "checkpoint_every_steps", "compile",
                      "num_workers", "pin_memory", "threads", "knn_every_epochs", "run_dir",
                      "keep_checkpoints", "max_unreadable_fraction"}


@dataclass
class Losses:
    dino: DINOLoss
    ibot: IBOTPatchLoss
    koleo: KoLeoLoss


@dataclass
class Components:
    """A run's parts. ``student``/``teacher`` are plain modules (wrapping happens later)."""

    student: SSLModel
    teacher: SSLModel
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    losses: Losses
    fingerprint: str
    total_steps: int  # the schedules' length
    steps_per_epoch: int
    last_step: int  # where this run stops (train.max_steps may stop it early)
    notes: list[str] = field(default_factory=list)  # schedule capping, for the logs
    chosen_steps: int | None = None  # the length a time budget chose (kept in checkpoints)
    precision: str | None = None  # what train.precision resolved to (kept in checkpoints)
    unreadable_files: list[str] = field(default_factory=list)  # ids replaced (kept in checkpoints)


def backbone_from_config(bb: BackboneConfig, img_size: int, in_chans: int) -> DinoVisionTransformer:
    """``pretrain.backbone`` -> the ViT (``arch`` preset, explicit sizes override it)."""
    sizes = {k: v for k, v in (("embed_dim", bb.embed_dim), ("depth", bb.depth),
                               ("num_heads", bb.num_heads), ("ffn", bb.ffn)) if v is not None}
    return build_backbone(
        None if bb.arch == "custom" else bb.arch, img_size=bb.pos_embed_size or img_size,
        patch_size=bb.patch_size, in_chans=in_chans, mlp_ratio=bb.mlp_ratio,
        num_register_tokens=bb.num_register_tokens, layerscale_init=bb.layerscale_init,
        drop_path_rate=bb.drop_path_rate, layer_norm_eps=bb.layer_norm_eps,
        interpolate_offset=bb.interpolate_offset, interpolate_antialias=bb.interpolate_antialias,
        **sizes,
    )  # fmt: skip


def build_student(cfg: PretrainConfig, in_chans: int) -> SSLModel:
    """Backbone + DINO head (+ a separate iBOT head when configured), freshly initialised."""
    backbone = backbone_from_config(cfg.backbone, cfg.crops.global_size, in_chans)
    h = cfg.head

    def head(k: int) -> DINOHead:
        return DINOHead(backbone.embed_dim, k, h.hidden_dim, h.bottleneck_dim, h.nlayers,
                        norm_last_layer=h.norm_last_layer)

    ibot = head(h.ibot_n_prototypes or h.n_prototypes) if h.separate_ibot_head else None
    return SSLModel(backbone, head(h.n_prototypes), ibot)


def build_losses(cfg: PretrainConfig, device: torch.device | str = "cpu") -> Losses:
    lc, h = cfg.loss, cfg.head
    k_ibot = (h.ibot_n_prototypes or h.n_prototypes) if h.separate_ibot_head else h.n_prototypes
    return Losses(
        dino=DINOLoss(h.n_prototypes, lc.student_temp, lc.center_momentum, lc.centering,
                      lc.sinkhorn_iterations).to(device),
        ibot=IBOTPatchLoss(k_ibot, lc.student_temp, lc.center_momentum, lc.centering,
                           lc.sinkhorn_iterations).to(device),
        koleo=KoLeoLoss(lc.koleo_eps),
    )  # fmt: skip


def peak_lr(cfg: PretrainConfig, global_batch: int) -> float:
    """The schedule's peak lr: ``base_lr``, scaled by sqrt(global_batch / 1024) under ``sqrt``."""
    o = cfg.optim
    return scaled_lr(o.base_lr, global_batch) if o.lr_scaling == "sqrt" else o.base_lr


def total_steps_for(cfg: PretrainConfig, n_images: int, world_size: int) -> tuple[int, int]:
    """(total_steps, steps_per_epoch): real epochs unless train.steps_per_epoch is set."""
    steps_per_epoch = cfg.train.steps_per_epoch or max(1, n_images // (cfg.train.batch_size * world_size))
    return max(1, int(round(cfg.train.epochs * steps_per_epoch))), steps_per_epoch


def schedules_for(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int,
                  global_batch: int) -> tuple[Schedules, list[str]]:
    o = cfg.optim
    return build_schedules(
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, base_lr=peak_lr(cfg, global_batch),
        min_lr=o.min_lr, warmup_epochs=o.warmup_epochs, wd_start=o.weight_decay_start,
        wd_end=o.weight_decay_end, momentum_start=o.momentum_teacher_start,
        momentum_end=o.momentum_teacher_end, momentum_shape=o.momentum_teacher_shape,
        teacher_temp_start=o.teacher_temp_start, teacher_temp_end=o.teacher_temp_end,
        teacher_temp_warmup_epochs=o.teacher_temp_warmup_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs, max_warmup_fraction=o.max_warmup_fraction,
        convention=o.schedule_convention,
    )  # fmt: skip


def set_run_length(run: Components, cfg: PretrainConfig, total_steps: int, global_batch: int) -> None:
    """A time budget chose the run's length: the schedules rebuilt for ``total_steps``."""
    run.schedules, notes = schedules_for(cfg, total_steps, run.steps_per_epoch, global_batch)
    for note in notes:
        log.warning(note)
    run.total_steps = run.chosen_steps = total_steps
    run.last_step = min(total_steps, cfg.train.max_steps or total_steps)


def run_fingerprint(cfg: PretrainConfig, n_images: int, world_size: int = 1) -> str:
    """Hash of what the run computes. The global batch (not the per-process one) enters it, so
    a checkpoint written by N processes resumes in M processes with the same global batch."""
    d = cfg.model_dump(mode="json")
    d["train"] = {k: v for k, v in d["train"].items() if k not in NOT_IN_FINGERPRINT}
    d["train"]["batch_size"] = cfg.train.batch_size * world_size
    d.pop("launcher")
    return fingerprint({"cfg": d, "n_images": n_images})


def _init_from_weights(cfg: PretrainConfig, student: SSLModel) -> None:
    """Continued pretraining: the backbone starts from a released (or dinoflow) file."""
    from dinoflow import tracking
    from dinoflow.weights import load_released_weights

    report = load_released_weights(student.backbone, cfg.init.weights,
                                   allow_missing=cfg.init.allow_missing)
    log.info("initialised the backbone from %s: %s", cfg.init.weights, report.summary())
    tracking.log_text(f"{cfg.init.weights}\n{report.summary()}", "init_weights_report.txt")
    if cfg.init.head_warmup_steps == 0:
        log.warning("pretrain.init.head_warmup_steps=0: the fresh heads' gradients reach the "
                    "loaded backbone from step 0 (docs/continue_pretraining.md)")


def build_components(cfg: PretrainConfig, n_images: int, in_chans: int, world_size: int = 1,
                     device: torch.device | str = "cpu", shard: bool = False) -> Components:
    """Seed, build student (from ``init.weights`` if set) and teacher, optimizer, schedules, losses.

    ``shard``: FSDP2 under torch.distributed; student and teacher are sharded alike (the EMA then
    runs shard by shard) before the optimizer is built on the sharded parameters.
    """
    t = cfg.train
    total_steps, steps_per_epoch = total_steps_for(cfg, n_images, world_size)
    torch.manual_seed(t.seed)
    student = build_student(cfg, in_chans).to(device)
    if cfg.init.weights:
        _init_from_weights(cfg, student)  # before make_teacher: the teacher starts from it too
    teacher = make_teacher(student)
    if shard:
        from dinoflow.distributed import shard_ssl_model

        device_type = torch.device(device).type
        shard_ssl_model(student, device_type)
        shard_ssl_model(teacher, device_type)
    schedules, notes = schedules_for(cfg, total_steps, steps_per_epoch, t.batch_size * world_size)
    for note in notes:
        log.warning(note)
    o = cfg.optim
    groups = param_groups(student.backbone, student.heads(), o.layer_decay, o.patch_embed_lr_mult)
    optimizer = build_optimizer(groups, o.betas, fused=t.fused_optimizer or None)
    return Components(
        student=student, teacher=teacher, optimizer=optimizer, schedules=schedules,
        losses=build_losses(cfg, device), fingerprint=run_fingerprint(cfg, n_images, world_size),
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        last_step=min(total_steps, t.max_steps or total_steps), notes=notes,
    )  # fmt: skip
