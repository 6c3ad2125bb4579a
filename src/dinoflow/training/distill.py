"""Distillation (DINOv2 section 5), read top to bottom: build, resume, wrap, loop, export.

The pretraining loop with three changes: the teacher is a larger frozen model (backbone and
heads, eval mode, never updated); the student sees no mask and has no stochastic depth, and the
iBOT loss covers every patch token of its two global crops; a spare EMA of the student is kept
and is the final model. DINO loss on the CLS of every student crop against the teacher's global
crops (never the same view), KoLeo on the student's global CLS, targets with the configured
centering, as in pretraining. A teacher without heads teaches its features instead
(``mode="features"``: cosine regression of linear projections of the student's CLS and patch
tokens onto the teacher's). Re-running after a kill resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.config import DistillationConfig, PretrainConfig, fingerprint
from dinoflow.data import Split
from dinoflow.distributed import resolve_device, world
from dinoflow.errors import ConfigError
from dinoflow.files import atomic_torch_save, atomic_write_json
from dinoflow.models.ssl import SSLModel, make_teacher
from dinoflow.models.vit import save_backbone
from dinoflow.monitor import target_entropy
from dinoflow.optim import (
    apply_schedules,
    build_optimizer,
    param_groups,
)
from dinoflow.results import DistillationSummary
from dinoflow.schedules import Schedules
from dinoflow.training.budget import fix_run_length, start_budget
from dinoflow.training.checkpoint import Checkpointer
from dinoflow.training.components import (
    Components,
    Losses,
    backbone_from_config,
    build_losses,
    build_student,
    run_fingerprint,
    schedules_for,
    total_steps_for,
)
from dinoflow.training.data import UnreadableFiles, build_loader
from dinoflow.training.export import write_history
from dinoflow.training.loop import pin_precision, resolve_auto, run_steps
from dinoflow.training.metrics import MetricLogger
from dinoflow.training.online_knn import OnlineKNN
from dinoflow.training.parallel import wrap_for_training
from dinoflow.training.step import autocast_for, update_and_report
from dinoflow.training.teacher import FrozenTeacher, backbone_flops

log = logging.getLogger(__name__)

__all__ = ["DistillationStudent", "build_distillation", "distill", "distill_step"]


class DistillationStudent(SSLModel):
    """The student: backbone and new heads, no mask token, every patch token to the iBOT head.

    forward(global_crops (2B, C, G, G), local_crops (N*B, C, L, L) | None) -> global_logits
    (2B, K), local_logits (N*B, K), patch_logits (2B * P, K) for the P patches of each global
    crop in row-major (crop, patch) order, global_cls (2B, D) backbone CLS (KoLeo). With linear
    heads (feature distillation) the "logits" are the projections onto the teacher's width.
    """

    def forward(self, global_crops: torch.Tensor,
                local_crops: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out_g = self.backbone.forward_features(global_crops)  # no masks: nothing is masked
        cls_g, patches = out_g["x_norm_clstoken"], out_g["x_norm_patchtokens"].flatten(0, 1)
        cls_l = None
        if local_crops is not None and local_crops.numel():
            grid = (local_crops.shape[-2] // self.backbone.patch_size) * (
                local_crops.shape[-1] // self.backbone.patch_size)
            cls_only = torch.zeros(local_crops.shape[0], grid, dtype=torch.bool, device=local_crops.device)
            cls_l = self.backbone.forward_features(local_crops, select=cls_only)["x_norm_clstoken"]
        cls = cls_g if cls_l is None else torch.cat([cls_g, cls_l])
        n_g, n_l = cls_g.shape[0], cls.shape[0] - cls_g.shape[0]
        if self.ibot_head is None:  # shared head: one pass over every token
            logits = self.dino_head(torch.cat([cls, patches]))
            cls_logits, patch_logits = logits[: cls.shape[0]], logits[cls.shape[0] :]
        else:
            cls_logits, patch_logits = self.dino_head(cls), self.ibot_head(patches)
        global_logits, local_logits = cls_logits.split([n_g, n_l])
        return {"global_logits": global_logits, "local_logits": local_logits,
                "patch_logits": patch_logits, "global_cls": cls_g}


def _student_heads(cfg: DistillationConfig, teacher: FrozenTeacher) -> tuple[int, int | None]:
    """(K of the student's DINO head, K of its separate iBOT head or None), from the teacher's."""
    if not teacher.has_heads:  # features: the heads are projections, no prototypes
        return cfg.head.n_prototypes or 2, None
    k, k_ibot = teacher.prototypes()
    h = cfg.head
    if h.n_prototypes is not None and h.n_prototypes != k:
        raise ConfigError(f"distillation.head.n_prototypes={h.n_prototypes}: the teacher's DINO head "
                          f"has {k} prototypes (the student learns its distributions); set it to "
                          f"{k} or null")
    separate = h.separate_ibot_head if h.separate_ibot_head is not None else k_ibot is not None
    if k_ibot is not None and k_ibot != k and not separate:
        raise ConfigError(f"distillation.head.separate_ibot_head=false: the teacher's iBOT head has "
                          f"{k_ibot} prototypes, its DINO head {k}; the student needs a separate one")
    return k, (k_ibot or k) if separate else None


def _check_grids(cfg: DistillationConfig, teacher: FrozenTeacher) -> None:
    """iBOT pairs the student's and the teacher's patch tokens: the same grid."""
    size = cfg.crops.global_size
    t_patch, s_patch = int(teacher.backbone.patch_size), cfg.backbone.patch_size
    if size % t_patch:
        raise ConfigError(f"distillation.crops.global_size={size} is not a multiple of the "
                          f"teacher's patch size {t_patch}")
    if size // t_patch != size // s_patch and cfg.loss.ibot_weight > 0:
        raise ConfigError(
            f"distillation.backbone.patch_size={s_patch}: at {size} px the student has a "
            f"{size // s_patch}x{size // s_patch} patch grid, the teacher (patch {t_patch}) "
            f"{size // t_patch}x{size // t_patch}; the patch loss pairs them token by token. Use "
            f"a patch size with the teacher's grid, or distillation.loss.ibot_weight=0")


def build_distillation(cfg: DistillationConfig, teacher: FrozenTeacher, n_images: int,
                       in_chans: int, world_size: int = 1,
                       device: torch.device | str = "cpu") -> tuple[Components, PretrainConfig]:
    """The student (new heads, or linear projections for a headless teacher), its EMA (in
    ``Components.teacher``: the model exported), optimizer, schedules, losses, fingerprint (the
    teacher's weights in it), and the student's settings as a ``PretrainConfig``."""
    _check_grids(cfg, teacher)
    k, k_ibot = _student_heads(cfg, teacher)
    pcfg = cfg.student_config(k, k_ibot)
    t = pcfg.train
    total_steps, steps_per_epoch = total_steps_for(pcfg, n_images, world_size)
    torch.manual_seed(t.seed)
    if teacher.has_heads:
        s = build_student(pcfg, in_chans)
        student = DistillationStudent(s.backbone, s.dino_head, s.ibot_head)
    else:  # features: projections of CLS and patch tokens onto the teacher's width
        backbone = backbone_from_config(pcfg.backbone, pcfg.crops.global_size, in_chans)
        width = teacher.backbone.embed_dim
        student = DistillationStudent(backbone, nn.Linear(backbone.embed_dim, width),
                                      nn.Linear(backbone.embed_dim, width))
    student = student.to(device)
    ema = make_teacher(student)
    schedules, notes = schedules_for(pcfg, total_steps, steps_per_epoch, t.batch_size * world_size)
    for note in notes:
        log.warning(note)
    o = pcfg.optim
    groups = param_groups(student.backbone, student.heads(), o.layer_decay, o.patch_embed_lr_mult)
    optimizer = build_optimizer(groups, o.betas, fused=t.fused_optimizer or None)
    fp = fingerprint({"student": run_fingerprint(pcfg, n_images, world_size),
                      "teacher": teacher.digest(), "mode": "heads" if teacher.has_heads else "features"})
    return Components(
        student=student, teacher=ema, optimizer=optimizer, schedules=schedules,
        losses=build_losses(pcfg, device), fingerprint=fp, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, last_step=min(total_steps, t.max_steps or total_steps),
        notes=notes,
    ), pcfg  # fmt: skip


def _prototype_terms(out: dict[str, torch.Tensor], t_cls: torch.Tensor, t_patch: torch.Tensor,
                     losses: Losses, temp: float, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(DINO, iBOT, teacher target entropy): the student's distributions against the frozen
    teacher's centred ones; iBOT over all P patches of each global crop, each weighted 1 / P."""
    dino_targets = losses.dino.teacher_targets(t_cls.view(2, b, -1), temp)
    ibot_targets = losses.ibot.teacher_targets(t_patch, temp)
    k = out["global_logits"].shape[-1]
    dino = losses.dino(out["global_logits"].float().view(2, b, k),
                       out["local_logits"].float().view(-1, b, k), dino_targets)
    n_global = 2 * b
    weights = t_patch.new_full((t_patch.shape[0],), n_global / t_patch.shape[0])
    ibot = losses.ibot(out["patch_logits"].float(), ibot_targets, weights, n_global)
    return dino, ibot, target_entropy(dino_targets)


def _feature_terms(out: dict[str, torch.Tensor], t_cls: torch.Tensor, t_patch: torch.Tensor,
                   b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CLS term, patch term, NaN): 1 - cosine between the projected student tokens and the
    teacher's; a global crop against the teacher on the same crop, a local crop against both
    teacher globals (the mean over all those pairs), patches position by position."""
    t = F.normalize(t_cls, dim=-1).view(2, b, -1)
    s_g = F.normalize(out["global_logits"].float(), dim=-1).view(2, b, -1)
    cos = [(s_g * t).sum(-1).mean(1)]  # (2,) same view
    if out["local_logits"].numel():
        s_l = F.normalize(out["local_logits"].float(), dim=-1).view(-1, b, t.shape[-1])
        cos.append(torch.einsum("nbd,jbd->nj", s_l, t).flatten() / b)  # (2N,) each local, each global
    cls_term = 1 - torch.cat(cos).mean()
    patch_term = 1 - F.cosine_similarity(out["patch_logits"].float(), t_patch, dim=-1).mean()
    return cls_term, patch_term, torch.tensor(float("nan"))


def distill_step(batch: dict[str, Any], step: int, student: nn.Module, ema: SSLModel,
                 teacher: FrozenTeacher, losses: Losses, optimizer: torch.optim.Optimizer,
                 schedules: Schedules, cfg: PretrainConfig,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """One distillation step: frozen teacher targets on the global crops, the unmasked student
    on every crop, DINO + iBOT (or the feature terms) + KoLeo, AdamW, the student's EMA."""
    lw = cfg.loss
    global_crops = batch["global_crops"].to(device, non_blocking=True)
    local_crops = batch["local_crops"].to(device, non_blocking=True) if batch["n_local"] else None
    b = batch["batch_size"]
    apply_schedules(optimizer, schedules.lr[step], schedules.wd[step],
                    freeze_last_layer=bool(schedules.last_layer_lr_zero[step]))
    with autocast_for(cfg, device):
        with torch.inference_mode():
            t_cls, t_patch = teacher.teacher_forward(global_crops)
        out = student(global_crops, local_crops)
    t_cls, t_patch = t_cls.float().clone(), t_patch.float().clone()  # fp32 targets, as pretraining
    if teacher.has_heads:
        dino, ibot, entropy = _prototype_terms(out, t_cls, t_patch, losses,
                                               float(schedules.teacher_temp[step]), b)
    else:
        dino, ibot, entropy = _feature_terms(out, t_cls, t_patch, b)
    koleo = sum(losses.koleo(view) for view in out["global_cls"].float().chunk(2))
    total = lw.dino_weight * dino + lw.ibot_weight * ibot + lw.koleo_weight * koleo
    terms = {"dino": dino, "ibot": ibot, "koleo": koleo, "total": total}
    # the EMA of the student is the final model; the frozen teacher never moves
    return update_and_report(terms, step, student, ema, optimizer, schedules, cfg, entropy,
                             out["global_cls"])


def export_student(ema: SSLModel, run_dir: Path) -> tuple[Path, Path]:
    """``student_backbone.pt`` (``save_backbone`` format) and ``student_heads.pt`` of the EMA."""
    backbone_path, heads_path = run_dir / "student_backbone.pt", run_dir / "student_heads.pt"
    save_backbone(ema.backbone, backbone_path)
    atomic_torch_save({k: m.state_dict() for k, m in ema.heads().items()}, heads_path)
    return backbone_path, heads_path


def distill(cfg: DistillationConfig, teacher: FrozenTeacher, train: Split, mean: list[float],
            std: list[float], knn_bank: Split | None = None, knn_queries: Split | None = None,
            stop_after_steps: int | None = None,
            teacher_info: dict[str, Any] | None = None) -> DistillationSummary:
    """Distil ``teacher`` into the student ``cfg`` describes on ``train``; export its EMA.

    ``mean``/``std``: the normalisation the teacher was trained with. ``stop_after_steps`` ends
    the process after a checkpoint (tests of resumption). One process (no launcher).
    """
    budget = start_budget(cfg.train.time_budget_min, "distillation")  # counts from here
    rank, world_size = world()
    if world_size > 1:
        raise ConfigError("distillation runs in one process (no distillation.launcher yet)")
    device, t = resolve_device(cfg.train.device), cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    teacher = teacher.to(device)
    run, pcfg = build_distillation(cfg, teacher, len(train), train.channels, 1, device)
    checkpoints = Checkpointer(t.run_dir, run.fingerprint, t.checkpoint_every_steps, t.keep_checkpoints)
    start_step, history = checkpoints.restore(run) if t.resume else (0, [])
    pcfg = resolve_auto(pcfg, train, device)  # before the wrap: it warns on loader workers
    pcfg, why = pin_precision(run, pcfg, checkpoints.restored_precision, device)
    precision = pcfg.train.precision
    model = wrap_for_training(run.student, teacher, pcfg, 1, device, False)
    loader_for = partial(build_loader, pcfg, train, mean, std, 0, 1, start_step, device=device)
    flops = {"student_flops": backbone_flops(run.teacher.backbone, pcfg.crops.global_size),
             "teacher_flops": backbone_flops(teacher.backbone, pcfg.crops.global_size)}
    log.info("distillation: precision %s (%s); FLOPs per image student %.3g, teacher %.3g (%.3f)",
             precision, why, flops["student_flops"], flops["teacher_flops"],
             flops["student_flops"] / flops["teacher_flops"])
    knn = None
    if knn_bank is not None and knn_queries is not None:
        knn = OnlineKNN(pcfg, knn_bank, knn_queries, mean, std, run.steps_per_epoch, device,
                        False, True, lambda: None)
        if start_step == 0:
            knn.check(run.teacher, 0, history)

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        return distill_step(batch, step, model, run.teacher, teacher, run.losses, run.optimizer,
                            run.schedules, pcfg, device)

    if budget is not None:  # the length, fixed before training: then a fixed-length run
        fix_run_length(budget, run, pcfg, start_step, checkpoints.restored_chosen_steps, step_fn,
                       loader_for, knn, device)
    _tag_run(run.fingerprint, precision, flops, teacher_info or {}, run.notes)
    metrics = MetricLogger(pcfg, run.schedules, history, start_step, run.last_step, 1, True,
                           "distill")
    t0 = time.perf_counter()
    run_steps(loader_for(run.last_step), model, run, metrics, knn, checkpoints, history,
              cfg.model_dump(mode="json"), stop_after_steps, step_fn,
              UnreadableFiles(run.unreadable_files, len(train), t.max_unreadable_fraction,
                              t.log_every_steps, "distillation.train.max_unreadable_fraction"))
    seconds = time.perf_counter() - t0
    run_dir = Path(t.run_dir)
    backbone_path, heads_path = export_student(run.teacher, run_dir)
    write_history(history, run_dir, pcfg)
    atomic_write_json(run_dir / "distillation_config.json", cfg.model_dump(mode="json"))
    checkpoints.clear()
    return DistillationSummary(
        run_dir=str(run_dir), student_backbone=str(backbone_path), student_heads=str(heads_path),
        teacher=dict(teacher_info or {}), mode="heads" if teacher.has_heads else "features",
        steps=run.last_step, resumed_from_step=start_step, final=metrics.final,
        knn_history=[h for h in history if "knn/top1_k20" in h],
        images_per_second=metrics.images_per_second(), train_seconds=seconds, **flops,
        notes=run.notes, fingerprint=run.fingerprint, mean=list(mean), std=list(std),
        channels=train.channels, image_size=pcfg.crops.global_size, precision=precision,
        **(budget.summary_fields() if budget else {}),
    )  # fmt: skip


def _tag_run(fp: str, precision: str, flops: dict[str, int], teacher_info: dict[str, Any],
             notes: list[str]) -> None:
    from dinoflow import tracking

    tracking.set_tags({"dinoflow.fingerprint": fp, "dinoflow.precision": precision,
                       "dinoflow.student_flops": flops["student_flops"],
                       "dinoflow.teacher_flops": flops["teacher_flops"],
                       **{f"dinoflow.teacher_{k}": v for k, v in teacher_info.items()
                          if v not in (None, "")}})
    tracking.log_text("\n".join(notes) or "no schedule capping", "schedule_notes.txt")
