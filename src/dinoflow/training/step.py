"""One DINOv2 training step, short enough to hold in your head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dinoflow.config import PretrainConfig
from dinoflow.losses.ibot import masked_token_weights
from dinoflow.models.ssl import SSLModel
from dinoflow.monitor import check_finite, normalized_std, target_entropy
from dinoflow.optim import apply_schedules, clip_gradients, ema_update
from dinoflow.precision import auto_precision, autocast
from dinoflow.schedules import Schedules
from dinoflow.training.components import Losses


def precision_choice(cfg: PretrainConfig, device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``train.precision``. auto (``dinoflow.precision.auto_precision``):
    bf16 autocast on CUDA; on a CPU, bf16 when it has bf16 matrix units and one MLP layer at the
    global crops' tokens x batch is large enough for bf16 to pay, else fp32. No timing."""
    want = cfg.train.precision
    if want != "auto":
        return want, f"train.precision={want}"
    tokens = (cfg.crops.global_size // cfg.backbone.patch_size) ** 2 + 1
    dim = cfg.backbone.embed_dim or 384
    return auto_precision(device, min(4096, 2 * cfg.train.batch_size * tokens), dim,
                          int(dim * cfg.backbone.mlp_ratio))


def resolve_precision(cfg: PretrainConfig, device: torch.device) -> str:
    return precision_choice(cfg, device)[0]


def autocast_for(cfg: PretrainConfig, device: torch.device):
    """The autocast context of the resolved precision (fp32 master weights either way)."""
    return autocast(resolve_precision(cfg, device), device)


def train_step(
    batch: dict[str, Any],
    step: int,
    student: nn.Module,
    teacher: SSLModel,
    losses: Losses,
    optimizer: torch.optim.Optimizer,
    schedules: Schedules,
    cfg: PretrainConfig,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One DINOv2 step: teacher targets, student pass, DINO + iBOT + KoLeo, AdamW, EMA."""
    lw = cfg.loss
    global_crops = batch["global_crops"].to(device, non_blocking=True)
    local_crops = batch["local_crops"].to(device, non_blocking=True) if batch["n_local"] else None
    masks = batch["masks"].to(device, non_blocking=True)
    n_global, b = global_crops.shape[0], batch["batch_size"]
    temp = float(schedules.teacher_temp[step])
    # continued pretraining: the backbone stays frozen (or nearly) while fresh heads settle
    warming_up = step < cfg.init.head_warmup_steps
    apply_schedules(optimizer, schedules.lr[step], schedules.wd[step],
                    freeze_last_layer=bool(schedules.last_layer_lr_zero[step]),
                    backbone_lr_scale=cfg.init.head_warmup_backbone_lr_mult if warming_up else 1.0)

    # the masked tokens padded to the batch's bound: the same shapes every step for compile;
    # the first n_masked rows are the real ones (counted on the host copy: no device sync)
    max_masked, n_masked = batch.get("max_masked"), int(batch["masks"].sum())
    with autocast_for(cfg, device):  # the networks in the run's precision (bf16 autocast or fp32)
        with torch.inference_mode():
            t_cls, t_masked = teacher.teacher_forward(global_crops, masks, max_masked)
        out = student(global_crops, local_crops, masks, max_masked)
    # targets, centering and losses in fp32 whatever the precision (as the reference on GPU);
    # inference tensors cannot be saved for backward: plain copies (2B x K, small)
    t_cls, t_masked = t_cls.float().clone(), t_masked[:n_masked].float().clone()
    dino_targets = losses.dino.teacher_targets(t_cls.view(2, b, -1), temp)
    ibot_targets = losses.ibot.teacher_targets(t_masked, temp)
    k = out["global_logits"].shape[-1]
    dino = losses.dino(out["global_logits"].float().view(2, b, k),
                       out["local_logits"].float().view(-1, b, k), dino_targets)
    ibot = losses.ibot(out["masked_logits"][:n_masked].float(), ibot_targets,
                       masked_token_weights(masks), n_global)
    koleo = sum(losses.koleo(view) for view in out["global_cls"].float().chunk(2))
    total = lw.dino_weight * dino + lw.ibot_weight * ibot + lw.koleo_weight * koleo

    terms = {"dino": dino, "ibot": ibot, "koleo": koleo, "total": total}
    return update_and_report(terms, step, student, teacher, optimizer, schedules, cfg,
                             target_entropy(dino_targets), out["global_cls"])


def update_and_report(terms: dict[str, torch.Tensor], step: int, student: nn.Module,
                      ema: nn.Module, optimizer: torch.optim.Optimizer, schedules: Schedules,
                      cfg: PretrainConfig, teacher_entropy: torch.Tensor,
                      global_cls: torch.Tensor) -> dict[str, torch.Tensor]:
    """The end of every step (pretraining and distillation): the finite check, backward,
    gradient clipping, AdamW, the EMA of the student; the step's logged numbers."""
    check_finite(step, terms, None, cfg)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    inner = student.module if hasattr(student, "module") else student
    grad_norms = {}
    if cfg.optim.clip_grad:
        grad_norms = clip_gradients({"backbone": inner.backbone, **inner.heads()}, cfg.optim.clip_grad)
    optimizer.step()
    ema_update(ema, inner, schedules.momentum[step])
    return {
        **{f"loss/{n}": v.detach() for n, v in terms.items()},
        "monitor/teacher_entropy": teacher_entropy,
        "monitor/student_cls_std": normalized_std(global_cls.detach()),
        **{f"grad_norm/{n}": torch.tensor(v) for n, v in grad_norms.items()},
    }
