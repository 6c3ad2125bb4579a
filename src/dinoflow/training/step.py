"""One DINOv2 training step, short enough to hold in your head."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from dinoflow.config import PretrainConfig
from dinoflow.losses.ibot import masked_token_weights
from dinoflow.models.ssl import SSLModel
from dinoflow.monitor import check_finite, normalized_std, target_entropy
from dinoflow.optim import apply_schedules, clip_gradients, ema_update
from dinoflow.schedules import Schedules
from dinoflow.training.components import Losses


def resolve_precision(cfg: PretrainConfig, device: torch.device) -> str:
    """``train.precision``: auto is bf16 autocast on CUDA, fp32 on CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_for(cfg: PretrainConfig, device: torch.device):
    """The autocast context of the resolved precision (fp32 master weights either way)."""
    if resolve_precision(cfg, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


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

    with autocast_for(cfg, device):
        with torch.inference_mode():
            t_cls, t_masked = teacher.teacher_forward(global_crops, masks)
        # inference tensors cannot be saved for backward: plain copies (2B x K, small)
        t_cls, t_masked = t_cls.clone(), t_masked.clone()
        dino_targets = losses.dino.teacher_targets(t_cls.float().view(2, b, -1), temp)
        ibot_targets = losses.ibot.teacher_targets(t_masked.float(), temp)

        out = student(global_crops, local_crops, masks)
        k = out["global_logits"].shape[-1]
        dino = losses.dino(out["global_logits"].view(2, b, k),
                           out["local_logits"].view(-1, b, k), dino_targets)
        ibot = losses.ibot(out["masked_logits"], ibot_targets, masked_token_weights(masks), n_global)
        koleo = sum(losses.koleo(view) for view in out["global_cls"].float().chunk(2))
        total = lw.dino_weight * dino + lw.ibot_weight * ibot + lw.koleo_weight * koleo

    terms = {"dino": dino, "ibot": ibot, "koleo": koleo, "total": total}
    check_finite(step, terms, None, cfg)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    inner = student.module if hasattr(student, "module") else student
    grad_norms = {}
    if cfg.optim.clip_grad:
        grad_norms = clip_gradients({"backbone": inner.backbone, **inner.heads()}, cfg.optim.clip_grad)
    optimizer.step()
    ema_update(teacher, inner, schedules.momentum[step])
    return {
        **{f"loss/{n}": v.detach() for n, v in terms.items()},
        "monitor/teacher_entropy": target_entropy(dino_targets),
        "monitor/student_cls_std": normalized_std(out["global_cls"].detach()),
        **{f"grad_norm/{n}": torch.tensor(v) for n, v in grad_norms.items()},
    }
