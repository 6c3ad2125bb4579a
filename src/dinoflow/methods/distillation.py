"""Distillation (DINOv2 section 5): a frozen larger teacher, a smaller student learning it.

The DINOv2 objective with three changes: the teacher is a frozen model (backbone and heads, eval
mode, never updated); the student sees no mask and has no stochastic depth, and the iBOT loss
covers every patch token of its two global crops; an EMA of the student is kept and is the final
model. DINO loss on the CLS of every student crop against the teacher's global crops (never the
same view), KoLeo on the student's global CLS, targets with the configured centering. A teacher
without heads teaches its features instead (``mode="features"``: cosine regression of linear
projections of the student's CLS and patch tokens onto the teacher's).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.config import DistillationConfig
from dinoflow.errors import ConfigError
from dinoflow.files import atomic_torch_save
from dinoflow.methods.base import Stateful, StepContext, StepTerms
from dinoflow.methods.dinov2 import Losses, backbone_from_config, build_losses, build_student
from dinoflow.methods.frozen_teacher import FrozenTeacher, backbone_flops
from dinoflow.models.ssl import SSLModel, make_teacher
from dinoflow.models.vit import save_backbone
from dinoflow.monitor import normalized_std, target_entropy
from dinoflow.optim import ema_update
from dinoflow.schedules import Schedules

log = logging.getLogger(__name__)


class DistillationStudent(SSLModel):
    """The student: backbone and new heads, no mask token, every patch token to the iBOT head.

    forward(global_crops (2B, C, G, G), local_crops (N*B, C, L, L) | None) -> global_logits
    (2B, K), local_logits (N*B, K), patch_logits (2B * P, K) for the P patches of each global
    crop in row-major (crop, patch) order, global_cls (2B, D) backbone CLS (KoLeo). With linear
    heads (feature distillation) the "logits" are the projections onto the teacher's width.
    """

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out_g = self.backbone.forward_features(global_crops)  # no masks: nothing is masked
        cls_g, patches = out_g["x_norm_clstoken"], out_g["x_norm_patchtokens"].flatten(0, 1)
        cls_l = None
        if local_crops is not None and local_crops.numel():
            grid = (local_crops.shape[-2] // self.backbone.patch_size) * (
                local_crops.shape[-1] // self.backbone.patch_size
            )
            cls_only = torch.zeros(
                local_crops.shape[0], grid, dtype=torch.bool, device=local_crops.device
            )
            cls_l = self.backbone.forward_features(local_crops, select=cls_only)["x_norm_clstoken"]
        cls = cls_g if cls_l is None else torch.cat([cls_g, cls_l])
        n_g, n_l = cls_g.shape[0], cls.shape[0] - cls_g.shape[0]
        if self.ibot_head is None:  # shared head: one pass over every token
            logits = self.dino_head(torch.cat([cls, patches]))
            cls_logits, patch_logits = logits[: cls.shape[0]], logits[cls.shape[0] :]
        else:
            cls_logits, patch_logits = self.dino_head(cls), self.ibot_head(patches)
        global_logits, local_logits = cls_logits.split([n_g, n_l])
        return {
            "global_logits": global_logits,
            "local_logits": local_logits,
            "patch_logits": patch_logits,
            "global_cls": cls_g,
        }


def student_heads(cfg: DistillationConfig, teacher: FrozenTeacher) -> tuple[int, int | None]:
    """(K of the student's DINO head, K of its separate iBOT head or None), from the teacher's."""
    if not teacher.has_heads:  # features: the heads are projections, no prototypes
        return cfg.head.n_prototypes or 2, None
    k, k_ibot = teacher.prototypes()
    h = cfg.head
    if h.n_prototypes is not None and h.n_prototypes != k:
        raise ConfigError(
            f"distillation.head.n_prototypes={h.n_prototypes}: the teacher's DINO head "
            f"has {k} prototypes (the student learns its distributions); set it to "
            f"{k} or null"
        )
    separate = h.separate_ibot_head if h.separate_ibot_head is not None else k_ibot is not None
    if k_ibot is not None and k_ibot != k and not separate:
        raise ConfigError(
            f"distillation.head.separate_ibot_head=false: the teacher's iBOT head has "
            f"{k_ibot} prototypes, its DINO head {k}; the student needs a separate one"
        )
    return k, (k_ibot or k) if separate else None


def check_grids(cfg: DistillationConfig, teacher: FrozenTeacher) -> None:
    """iBOT pairs the student's and the teacher's patch tokens: the same grid."""
    size = cfg.crops.global_size
    t_patch, s_patch = int(teacher.backbone.patch_size), cfg.backbone.patch_size
    if size % t_patch:
        raise ConfigError(
            f"distillation.crops.global_size={size} is not a multiple of the "
            f"teacher's patch size {t_patch}"
        )
    if size // t_patch != size // s_patch and cfg.loss.ibot_weight > 0:
        raise ConfigError(
            f"distillation.backbone.patch_size={s_patch}: at {size} px the student has a "
            f"{size // s_patch}x{size // s_patch} patch grid, the teacher (patch {t_patch}) "
            f"{size // t_patch}x{size // t_patch}; the patch loss pairs them token by token. Use "
            f"a patch size with the teacher's grid, or distillation.loss.ibot_weight=0"
        )


class Distillation:
    """Distillation as one object: the frozen ``teacher``, the student (new heads, or linear
    projections for a headless teacher) and its EMA (the model exported), the losses.

    ``cfg``: the student's settings as a ``PretrainConfig`` (the trainer, loader and logger
    read it).
    """

    name = "distillation"
    loss_names = ("dino", "ibot", "koleo")

    def __init__(
        self,
        dcfg: DistillationConfig,
        teacher: FrozenTeacher,
        in_chans: int,
        device: torch.device | str = "cpu",
        teacher_info: dict[str, Any] | None = None,
    ):
        check_grids(dcfg, teacher)
        k, k_ibot = student_heads(dcfg, teacher)
        self.cfg = dcfg.student_config(k, k_ibot)
        self.in_chans, self.teacher = in_chans, teacher.to(device)
        self.teacher_info = dict(teacher_info or {})
        torch.manual_seed(self.cfg.train.seed)
        self.student = self._build_student(in_chans).to(device)
        self.ema = make_teacher(self.student)
        self.losses = build_losses(self.cfg, device)
        size = self.cfg.crops.global_size
        self.flops = {
            "student_flops": backbone_flops(self.ema.backbone, size),
            "teacher_flops": backbone_flops(self.teacher.backbone, size),
        }

    @property
    def mode(self) -> str:
        return "heads" if self.teacher.has_heads else "features"

    def _build_student(self, in_chans: int) -> DistillationStudent:
        if self.teacher.has_heads:
            s = build_student(self.cfg, in_chans)
            return DistillationStudent(s.backbone, s.dino_head, s.ibot_head)
        # features: projections of CLS and patch tokens onto the teacher's width
        backbone = backbone_from_config(self.cfg.backbone, self.cfg.crops.global_size, in_chans)
        width = self.teacher.backbone.embed_dim
        return DistillationStudent(
            backbone, nn.Linear(backbone.embed_dim, width), nn.Linear(backbone.embed_dim, width)
        )

    def fingerprint_extra(self) -> dict[str, Any]:
        """The teacher's weights and the mode enter the run's fingerprint."""
        return {"teacher": self.teacher.digest(), "mode": self.mode}

    def parts(self) -> dict[str, Stateful]:
        # the EMA is saved under "teacher": the model this run exports
        return {
            "student": self.student,
            "teacher": self.ema,
            "dino_loss": self.losses.dino,
            "ibot_loss": self.losses.ibot,
        }

    def terms(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepTerms:
        """Frozen teacher targets on the global crops, the unmasked student on every crop,
        DINO + iBOT (or the feature terms) + KoLeo."""
        lw, device = self.cfg.loss, ctx.device
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = (
            batch["local_crops"].to(device, non_blocking=True) if batch["n_local"] else None
        )
        b = batch["batch_size"]
        with ctx.autocast():
            with torch.inference_mode():
                t_cls, t_patch = self.teacher.teacher_forward(global_crops)
            out = model(global_crops, local_crops)
        t_cls, t_patch = t_cls.float().clone(), t_patch.float().clone()  # fp32 targets
        if self.teacher.has_heads:
            temp = float(ctx.schedules.teacher_temp[ctx.step])
            dino, ibot, entropy = prototype_terms(out, t_cls, t_patch, self.losses, temp, b)
        else:
            dino, ibot, entropy = feature_terms(out, t_cls, t_patch, b)
        koleo = sum(self.losses.koleo(view) for view in out["global_cls"].float().chunk(2))
        total = lw.dino_weight * dino + lw.ibot_weight * ibot + lw.koleo_weight * koleo
        return StepTerms(
            terms={"dino": dino, "ibot": ibot, "koleo": koleo, "total": total},
            monitors={
                "monitor/teacher_entropy": entropy,
                "monitor/student_cls_std": normalized_std(out["global_cls"].detach()),
            },
        )

    def update_teacher(self, step: int, schedules: Schedules) -> None:
        """The EMA of the student (the final model); the frozen teacher never moves."""
        ema_update(self.ema, self.student, schedules.momentum[step])

    def fresh_backbone(self) -> nn.Module:
        return backbone_from_config(self.cfg.backbone, self.cfg.crops.global_size, self.in_chans)

    def export(self, run_dir: Path, main: bool, fsdp: bool) -> tuple[Path, Path]:
        return export_student(self.ema, run_dir)

    def tags(self) -> dict[str, Any]:
        return {
            "dinoflow.method": self.name,
            **{f"dinoflow.{k}": v for k, v in self.flops.items()},
            **{
                f"dinoflow.teacher_{k}": v
                for k, v in self.teacher_info.items()
                if v not in (None, "")
            },
        }


def prototype_terms(
    out: dict[str, torch.Tensor],
    t_cls: torch.Tensor,
    t_patch: torch.Tensor,
    losses: Losses,
    temp: float,
    b: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(DINO, iBOT, teacher target entropy): the student's distributions against the frozen
    teacher's centred ones; iBOT over all P patches of each global crop, each weighted 1 / P."""
    dino_targets = losses.dino.teacher_targets(t_cls.view(2, b, -1), temp)
    ibot_targets = losses.ibot.teacher_targets(t_patch, temp)
    k = out["global_logits"].shape[-1]
    dino = losses.dino(
        out["global_logits"].float().view(2, b, k),
        out["local_logits"].float().view(-1, b, k),
        dino_targets,
    )
    n_global = 2 * b
    weights = t_patch.new_full((t_patch.shape[0],), n_global / t_patch.shape[0])
    ibot = losses.ibot(out["patch_logits"].float(), ibot_targets, weights, n_global)
    return dino, ibot, target_entropy(dino_targets)


def feature_terms(
    out: dict[str, torch.Tensor], t_cls: torch.Tensor, t_patch: torch.Tensor, b: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CLS term, patch term, NaN): 1 - cosine between the projected student tokens and the
    teacher's; a global crop against the teacher on the same crop, a local crop against both
    teacher globals (the mean over all those pairs), patches position by position."""
    t = F.normalize(t_cls, dim=-1).view(2, b, -1)
    s_g = F.normalize(out["global_logits"].float(), dim=-1).view(2, b, -1)
    cos = [(s_g * t).sum(-1).mean(1)]  # (2,) same view
    if out["local_logits"].numel():
        s_l = F.normalize(out["local_logits"].float(), dim=-1).view(-1, b, t.shape[-1])
        cos.append(
            torch.einsum("nbd,jbd->nj", s_l, t).flatten() / b
        )  # (2N,) each local, each global
    cls_term = 1 - torch.cat(cos).mean()
    patch_term = 1 - F.cosine_similarity(out["patch_logits"].float(), t_patch, dim=-1).mean()
    return cls_term, patch_term, torch.tensor(float("nan"))


def export_student(ema: SSLModel, run_dir: Path) -> tuple[Path, Path]:
    """``student_backbone.pt`` (``save_backbone`` format) and ``student_heads.pt`` of the EMA."""
    backbone_path, heads_path = run_dir / "student_backbone.pt", run_dir / "student_heads.pt"
    save_backbone(ema.backbone, backbone_path)
    atomic_torch_save({k: m.state_dict() for k, m in ema.heads().items()}, heads_path)
    return backbone_path, heads_path
