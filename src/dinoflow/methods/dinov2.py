"""DINOv2 (docs/method.md): a student and its EMA teacher, DINO on the CLS tokens of every crop,
iBOT on the masked patches of the global crops, KoLeo on the global CLS; DINOv3's Gram anchoring
as an option (``pretrain.gram``)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinoflow.config import BackboneConfig, PretrainConfig
from dinoflow.errors import ConfigError
from dinoflow.files import atomic_torch_save
from dinoflow.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from dinoflow.losses.gram import GramLoss
from dinoflow.losses.ibot import masked_token_weights
from dinoflow.methods.base import Stateful, StepContext, StepTerms
from dinoflow.models.heads import DINOHead
from dinoflow.models.ssl import SSLModel, make_teacher
from dinoflow.models.vit import DinoVisionTransformer, build_backbone, save_backbone
from dinoflow.monitor import normalized_std, target_entropy
from dinoflow.optim import ema_update
from dinoflow.schedules import Schedules

log = logging.getLogger(__name__)


@dataclass
class Losses:
    """The prototype losses DINOv2 and distillation share (DINO and iBOT keep centers)."""

    dino: DINOLoss
    ibot: IBOTPatchLoss
    koleo: KoLeoLoss


def backbone_from_config(bb: BackboneConfig, img_size: int, in_chans: int) -> DinoVisionTransformer:
    """``pretrain.backbone`` -> the ViT (``arch`` preset, explicit sizes override it)."""
    sizes = {
        k: v
        for k, v in (
            ("embed_dim", bb.embed_dim),
            ("depth", bb.depth),
            ("num_heads", bb.num_heads),
            ("ffn", bb.ffn),
        )
        if v is not None
    }
    return build_backbone(
        None if bb.arch == "custom" else bb.arch,
        img_size=bb.pos_embed_size or img_size,
        patch_size=bb.patch_size,
        in_chans=in_chans,
        mlp_ratio=bb.mlp_ratio,
        num_register_tokens=bb.num_register_tokens,
        layerscale_init=bb.layerscale_init,
        drop_path_rate=bb.drop_path_rate,
        layer_norm_eps=bb.layer_norm_eps,
        interpolate_offset=bb.interpolate_offset,
        interpolate_antialias=bb.interpolate_antialias,
        **sizes,
    )


def build_student(cfg: PretrainConfig, in_chans: int) -> SSLModel:
    """Backbone + DINO head (+ a separate iBOT head when configured), freshly initialised."""
    backbone = backbone_from_config(cfg.backbone, cfg.crops.global_size, in_chans)
    h = cfg.head

    def head(k: int) -> DINOHead:
        return DINOHead(
            backbone.embed_dim,
            k,
            h.hidden_dim,
            h.bottleneck_dim,
            h.nlayers,
            norm_last_layer=h.norm_last_layer,
        )

    ibot = head(h.ibot_n_prototypes or h.n_prototypes) if h.separate_ibot_head else None
    return SSLModel(backbone, head(h.n_prototypes), ibot)


def build_losses(cfg: PretrainConfig, device: torch.device | str = "cpu") -> Losses:
    lc, h = cfg.loss, cfg.head
    k_ibot = (h.ibot_n_prototypes or h.n_prototypes) if h.separate_ibot_head else h.n_prototypes

    def centred(loss_cls: type, k: int) -> nn.Module:
        return loss_cls(
            k, lc.student_temp, lc.center_momentum, lc.centering, lc.sinkhorn_iterations
        ).to(device)

    return Losses(
        dino=centred(DINOLoss, h.n_prototypes),
        ibot=centred(IBOTPatchLoss, k_ibot),
        koleo=KoLeoLoss(lc.koleo_eps),
    )


def init_from_weights(cfg: PretrainConfig, student: SSLModel) -> None:
    """Continued pretraining: the backbone starts from a released (or dinoflow) file."""
    from dinoflow import tracking
    from dinoflow.weights import load_released_weights

    report = load_released_weights(
        student.backbone, cfg.init.weights, allow_missing=cfg.init.allow_missing
    )
    log.info("initialised the backbone from %s: %s", cfg.init.weights, report.summary())
    tracking.log_text(f"{cfg.init.weights}\n{report.summary()}", "init_weights_report.txt")
    if cfg.init.head_warmup_steps == 0:
        log.warning(
            "pretrain.init.head_warmup_steps=0: the fresh heads' gradients reach the "
            "loaded backbone from step 0 (docs/continue_pretraining.md)"
        )


class DINOv2:
    """DINOv2 as one object: student, EMA teacher, losses (and the Gram teacher when on).

    Built from ``cfg`` in a fixed order after ``torch.manual_seed(train.seed)`` (the student's
    initial weights are a function of the seed). ``shard``: FSDP2 under torch.distributed;
    student and teacher are sharded alike (the EMA then runs shard by shard).
    """

    name = "dinov2"

    def __init__(
        self,
        cfg: PretrainConfig,
        in_chans: int,
        device: torch.device | str = "cpu",
        shard: bool = False,
    ):
        self.cfg, self.in_chans = cfg, in_chans
        torch.manual_seed(cfg.train.seed)
        self.student = build_student(cfg, in_chans).to(device)
        if cfg.init.weights:
            init_from_weights(cfg, self.student)  # before the teacher: it starts from it too
        self.teacher = make_teacher(self.student)
        self.gram = cfg.gram if cfg.gram.weight > 0 else None
        self.gram_teacher: DinoVisionTransformer | None = None
        if self.gram is not None:
            if shard:
                raise ConfigError(
                    "pretrain.gram.weight > 0 with launcher.strategy=fsdp: the Gram "
                    "teacher is not sharded; use launcher.strategy=ddp"
                )
            # the EMA backbone as it is now: the copy first_update_step=0 asks for
            self.gram_teacher = copy.deepcopy(self.teacher.backbone)
        if shard:
            from dinoflow.distributed import shard_ssl_model

            device_type = torch.device(device).type
            shard_ssl_model(self.student, device_type)
            shard_ssl_model(self.teacher, device_type)
        self.losses = build_losses(cfg, device)
        self.gram_loss = GramLoss()

    @property
    def ema(self) -> SSLModel:
        return self.teacher

    @property
    def loss_names(self) -> tuple[str, ...]:
        return ("dino", "ibot", "koleo") + (("gram",) if self.gram is not None else ())

    def parts(self) -> dict[str, Stateful]:
        parts: dict[str, Stateful] = {
            "student": self.student,
            "teacher": self.teacher,
            "dino_loss": self.losses.dino,
            "ibot_loss": self.losses.ibot,
        }
        if self.gram_teacher is not None:
            parts["gram_teacher"] = self.gram_teacher
        return parts

    def gram_on(self, step: int) -> bool:
        return self.gram is not None and step >= self.gram.first_update_step

    def terms(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepTerms:
        """DINO + iBOT + KoLeo (+ Gram) of one batch: teacher targets, the student pass."""
        lw, device, step = self.cfg.loss, ctx.device, ctx.step
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = (
            batch["local_crops"].to(device, non_blocking=True) if batch["n_local"] else None
        )
        masks = batch["masks"].to(device, non_blocking=True)
        n_global, b = global_crops.shape[0], batch["batch_size"]
        temp = float(ctx.schedules.teacher_temp[step])
        gram = self.gram_on(step)
        # the masked tokens padded to the batch's bound: the same shapes every step for compile;
        # the first n_masked rows are the real ones (counted on the host copy: no device sync)
        max_masked, n_masked = batch.get("max_masked"), int(batch["masks"].sum())
        with ctx.autocast():  # the networks in the run's precision (bf16 autocast or fp32)
            with torch.inference_mode():
                t_cls, t_masked = self.teacher.teacher_forward(global_crops, masks, max_masked)
                if gram:
                    t_patches = self.gram_teacher.forward_patches(global_crops)
            out = model(global_crops, local_crops, masks, max_masked, patches=gram)
        # targets, centering and losses in fp32 whatever the precision (as the reference on
        # GPU); inference tensors cannot be saved for backward: plain copies (2B x K, small)
        t_cls, t_masked = t_cls.float().clone(), t_masked[:n_masked].float().clone()
        dino_targets = self.losses.dino.teacher_targets(t_cls.view(2, b, -1), temp)
        ibot_targets = self.losses.ibot.teacher_targets(t_masked, temp)
        k = out["global_logits"].shape[-1]
        dino = self.losses.dino(
            out["global_logits"].float().view(2, b, k),
            out["local_logits"].float().view(-1, b, k),
            dino_targets,
        )
        ibot = self.losses.ibot(
            out["masked_logits"][:n_masked].float(),
            ibot_targets,
            masked_token_weights(masks),
            n_global,
        )
        koleo = sum(self.losses.koleo(view) for view in out["global_cls"].float().chunk(2))
        terms = {"dino": dino, "ibot": ibot, "koleo": koleo}
        total = lw.dino_weight * dino + lw.ibot_weight * ibot + lw.koleo_weight * koleo
        if self.gram is not None:  # logged from step 0 (0 before the Gram teacher's first copy)
            terms["gram"] = (
                self.gram_loss(out["global_patches"], t_patches.float().clone())
                if gram
                else dino.new_zeros(())
            )
            total = total + self.gram.weight * terms["gram"]
        return StepTerms(
            terms={**terms, "total": total},
            monitors={
                "monitor/teacher_entropy": target_entropy(dino_targets),
                "monitor/student_cls_std": normalized_std(out["global_cls"].detach()),
            },
        )

    def update_teacher(self, step: int, schedules: Schedules) -> None:
        """The EMA of the student; then the Gram teacher's copy of the EMA when due: before
        step ``first_update_step`` and every ``update_every`` steps after it."""
        ema_update(self.teacher, self.student, schedules.momentum[step])
        g, following = self.gram, step + 1
        if g is None or following < g.first_update_step:
            return
        since = following - g.first_update_step
        if since == 0 or (g.update_every is not None and since % g.update_every == 0):
            with torch.no_grad():
                self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())

    def fresh_backbone(self) -> DinoVisionTransformer:
        return backbone_from_config(self.cfg.backbone, self.cfg.crops.global_size, self.in_chans)

    def fingerprint_extra(self) -> dict[str, Any]:
        return {}

    def export(self, run_dir: Path, main: bool, fsdp: bool) -> tuple[Path, Path]:
        return export_teacher(
            self.teacher, run_dir, main, fsdp, lambda: build_student(self.cfg, self.in_chans)
        )

    def tags(self) -> dict[str, Any]:
        return {"dinoflow.method": self.name}


def export_teacher(
    teacher: SSLModel, run_dir: Path, main: bool, fsdp: bool, build_student
) -> tuple[Path, Path]:
    """Write ``teacher_backbone.pt`` (``save_backbone`` format) and ``teacher_heads.pt``.

    Under FSDP the shards are gathered on every rank (a collective) and written from an
    unsharded copy (``build_student()``) on the main process.
    """
    backbone_path, heads_path = run_dir / "teacher_backbone.pt", run_dir / "teacher_heads.pt"
    export = teacher
    if fsdp:
        from dinoflow.distributed import gather_full_state
        from dinoflow.models.ssl import make_teacher

        teacher_sd = gather_full_state(teacher)[0]
        if main:
            export = make_teacher(build_student())
            export.load_state_dict(teacher_sd)
    if main:
        save_backbone(export.backbone, backbone_path)
        atomic_torch_save({k: m.state_dict() for k, m in export.heads().items()}, heads_path)
    return backbone_path, heads_path
