"""DINOv2 pretraining: the loop, readable top to bottom.

``pretrain(cfg, train_split, ...)`` builds the student and the EMA teacher, the multi-crop data,
the losses and schedules, then runs ``train_step`` until the end, writing atomic checkpoints
that hold everything needed to continue exactly (weights, optimiser, centers, step, RNG state;
the data order and the augmentations are functions of (seed, step), so they need no state).
Re-running after a kill resumes by itself. Under torch.distributed (torchrun, SLURM) each
process takes its slice of the global batch; only rank 0 writes.

``python -m dinoflow.train`` / ``torchrun -m dinoflow.train`` is the entry point for clusters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dinoflow import tracking
from dinoflow.augment import MultiCropAugmentation, collate_multicrop
from dinoflow.checkpoint import (
    atomic_torch_save,
    fingerprint,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from dinoflow.losses.ibot import masked_token_weights
from dinoflow.masking import BlockMaskGenerator, sample_masks
from dinoflow.models.heads import DINOHead
from dinoflow.models.vit import DinoVisionTransformer, save_backbone
from dinoflow.monitor import (
    TrainingDiverged,
    check_finite,
    collapse_warning,
    normalized_std,
    target_entropy,
)
from dinoflow.optim import (
    apply_schedules,
    build_optimizer,
    clip_gradients,
    ema_update,
    param_groups,
)
from dinoflow.schedules import Schedules, build_schedules, scaled_lr
from dinoflow.student_teacher import SSLModel, make_teacher

log = logging.getLogger(__name__)

# Settings that do not change what a run computes (so a resumed run may differ in them).
_NOT_IN_FINGERPRINT = {"progress", "resume", "log_every_steps", "checkpoint_every_steps", "compile",
                       "num_workers", "pin_memory", "threads", "knn_every_epochs", "run_dir"}


# --------------------------------------------------------------------------- distributed
def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(cfg: PretrainConfig) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("pretrain.train.device=cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_for(cfg: PretrainConfig, device: torch.device):
    """bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls are ~100x slower on most CPUs)."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- data
class MultiCropDataset(Dataset):
    """Items are (step, data_epoch, index); crops are a pure function of (seed, epoch, index).

    Seeding per sample makes the views independent of workers, ranks and resumption.
    """

    def __init__(self, split: Split, augmentation: MultiCropAugmentation, seed: int):
        self.split, self.augmentation, self.seed = split, augmentation, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        step, epoch, index = item
        # a generator of its own: the global RNG stays untouched, and torch.manual_seed would
        # also queue a CUDA seeding with a formatted stack trace (14% of the loader's time)
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        crops = self.augmentation(self.split.load(index), generator=rng)
        crops["step"] = step
        return crops


class StepBatchSampler:
    """Per-rank batches for steps [start_step, total_steps) through DistributedSampler.

    Data epoch e is DistributedSampler's epoch-seeded permutation; batch b of rank r is its
    rank-slice [b*B, (b+1)*B): across ranks that is exactly the single-process global batch b.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int, total_steps: int):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.batches_per_epoch = n // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"{n} training images are fewer than one global batch "
                             f"({batch_size} x {world_size} processes): lower pretrain.train.batch_size")

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self):
        sampler = DistributedSampler(range(self.n), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        epoch = -1
        order: list[int] = []
        for step in range(self.start_step, self.total_steps):
            e, b = divmod(step, self.batches_per_epoch)
            if e != epoch:
                epoch = e
                sampler.set_epoch(e)
                order = list(sampler)
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(step, e, i) for i in rows]


class MaskingCollate:
    """Stacks crops and adds iBOT masks drawn for the global batch from (seed, step).

    Masks are drawn for all 2 * B * world crops and each rank keeps the rows of its images, so
    1 process and N processes see the same masks for the same image.
    """

    def __init__(self, cfg: PretrainConfig, rank: int, world_size: int):
        grid = cfg.crops.global_size // cfg.backbone.patch_size
        m = cfg.masking
        self.generator = BlockMaskGenerator((grid, grid), max_mask_ratio=m.max_mask_ratio,
                                            min_num_patches=m.min_num_patches,
                                            min_aspect=m.min_aspect, max_attempts=m.max_attempts,
                                            reject_small_blocks=m.reject_small_blocks)
        self.grid, self.m, self.seed = (grid, grid), m, cfg.train.seed
        self.rank, self.world_size = rank, world_size

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        step = samples[0]["step"]
        batch = collate_multicrop(samples)
        b, g = batch["batch_size"], batch["batch_size"] * self.world_size
        rng = np.random.default_rng([self.seed, step, 7])
        masks = sample_masks(2 * g, self.grid, self.generator, rng, self.m.mask_probability,
                             (self.m.ratio_min, self.m.ratio_max))
        # global position of local image j on this rank is rank + world * j (DistributedSampler)
        mine = self.rank + self.world_size * torch.arange(b)
        batch["masks"] = torch.cat([masks[mine], masks[g + mine]])
        batch["step"] = step
        return batch


# --------------------------------------------------------------------------- model
def build_backbone(cfg: PretrainConfig, in_chans: int) -> DinoVisionTransformer:
    from dinoflow.models.vit import VIT_PRESETS

    bb = cfg.backbone
    dim, depth, heads = VIT_PRESETS.get(bb.arch, (None, None, None))
    return DinoVisionTransformer(
        img_size=bb.pos_embed_size or cfg.crops.global_size, patch_size=bb.patch_size,
        in_chans=in_chans,
        embed_dim=bb.embed_dim or dim, depth=bb.depth or depth, num_heads=bb.num_heads or heads,
        mlp_ratio=bb.mlp_ratio, num_register_tokens=bb.num_register_tokens,
        layerscale_init=bb.layerscale_init, drop_path_rate=bb.drop_path_rate,
        layer_norm_eps=bb.layer_norm_eps, ffn=bb.ffn,
        interpolate_offset=bb.interpolate_offset, interpolate_antialias=bb.interpolate_antialias,
    )  # fmt: skip


def build_student(cfg: PretrainConfig, in_chans: int) -> SSLModel:
    backbone = build_backbone(cfg, in_chans)
    h = cfg.head

    def head(k: int) -> DINOHead:
        return DINOHead(backbone.embed_dim, k, h.hidden_dim, h.bottleneck_dim, h.nlayers,
                        norm_last_layer=h.norm_last_layer)

    ibot = head(h.ibot_n_prototypes or h.n_prototypes) if h.separate_ibot_head else None
    return SSLModel(backbone, head(h.n_prototypes), ibot)


# --------------------------------------------------------------------------- the step
@dataclass
class Losses:
    dino: DINOLoss
    ibot: IBOTPatchLoss
    koleo: KoLeoLoss


def compile_for_training(model: nn.Module, teacher: SSLModel | None) -> nn.Module:
    """``train.compile``: the student's module compiled, and the teacher's pass compiled in place.

    The teacher's ``teacher_forward`` (inference mode, parameters moved by the EMA between
    calls: they are graph inputs, not constants) is replaced on the instance only; its state
    dict is unchanged. FSDP registers that method itself, so it passes ``teacher=None``.
    """
    if teacher is not None:
        teacher.teacher_forward = torch.compile(teacher.teacher_forward)
    return torch.compile(model)


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
    check_finite(step, terms, None)
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


# --------------------------------------------------------------------------- the run
@dataclass
class PretrainResult:
    run_dir: str
    teacher_backbone: str
    teacher_heads: str
    steps: int
    resumed_from_step: int
    final: dict[str, float]
    knn_history: list[dict[str, float]] = field(default_factory=list)
    images_per_second: float = 0.0
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


def run_fingerprint(cfg: PretrainConfig, n_images: int, world_size: int = 1) -> str:
    """Hash of what the run computes. The global batch (not the per-process one) enters it, so
    a checkpoint written by N processes resumes in M processes with the same global batch."""
    d = cfg.model_dump(mode="json")
    d["train"] = {k: v for k, v in d["train"].items() if k not in _NOT_IN_FINGERPRINT}
    d["train"]["batch_size"] = cfg.train.batch_size * world_size
    d.pop("launcher")
    return fingerprint({"cfg": d, "n_images": n_images})


def total_steps_for(cfg: PretrainConfig, n_images: int, world_size: int) -> tuple[int, int]:
    """(total_steps, steps_per_epoch): real epochs unless train.steps_per_epoch is set."""
    steps_per_epoch = cfg.train.steps_per_epoch or max(1, n_images // (cfg.train.batch_size * world_size))
    return max(1, int(round(cfg.train.epochs * steps_per_epoch))), steps_per_epoch


def pretrain(
    cfg: PretrainConfig,
    train: Split,
    mean: list[float],
    std: list[float],
    knn_bank: Split | None = None,
    knn_queries: Split | None = None,
    stop_after_steps: int | None = None,
    on_knn: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Train a DINOv2 student/teacher on ``train``; write the teacher backbone and heads.

    ``stop_after_steps`` ends the process early after a checkpoint (tests of resumption).
    ``on_knn(step, top1)`` is called after each online kNN check (e.g. an Optuna pruner); it may
    raise to stop the run. A fresh run checks kNN at step 0 too: the starting point.
    """
    rank, world_size = world()
    device = resolve_device(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    t = cfg.train
    run_dir = Path(t.run_dir)
    n = len(train)
    total_steps, steps_per_epoch = total_steps_for(cfg, n, world_size)
    last_step = min(total_steps, t.max_steps or total_steps)
    fp = run_fingerprint(cfg, n, world_size)
    ckpt_path = run_dir / "checkpoints" / f"{fp}.pt"

    torch.manual_seed(t.seed)
    student = build_student(cfg, train.channels).to(device)
    if cfg.init.weights:
        from dinoflow.weights import load_released_weights

        # before make_teacher: the teacher starts from the same loaded weights
        report = load_released_weights(student.backbone, cfg.init.weights,
                                       allow_missing=cfg.init.allow_missing)
        log.info("initialised the backbone from %s: %s", cfg.init.weights, report.summary())
        tracking.log_text(f"{cfg.init.weights}\n{report.summary()}", "init_weights_report.txt")
        if cfg.init.head_warmup_steps == 0:
            log.warning("pretrain.init.head_warmup_steps=0: the fresh heads' gradients reach the "
                        "loaded backbone from step 0 (docs/continue_pretraining.md)")
    teacher = make_teacher(student)
    # FSDP2: student and teacher sharded alike (the EMA then runs shard by shard); the
    # optimizer is built on the sharded parameters
    fsdp = world_size > 1 and cfg.launcher.strategy == "fsdp"
    if fsdp:
        from dinoflow.launch import shard_ssl_model

        shard_ssl_model(student, device.type)
        shard_ssl_model(teacher, device.type)
    o = cfg.optim
    global_batch = t.batch_size * world_size
    peak_lr = scaled_lr(o.base_lr, global_batch) if o.lr_scaling == "sqrt" else o.base_lr
    schedules, notes = build_schedules(
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, base_lr=peak_lr, min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs, wd_start=o.weight_decay_start, wd_end=o.weight_decay_end,
        momentum_start=o.momentum_teacher_start, momentum_end=o.momentum_teacher_end,
        momentum_shape=o.momentum_teacher_shape,
        teacher_temp_start=o.teacher_temp_start, teacher_temp_end=o.teacher_temp_end,
        teacher_temp_warmup_epochs=o.teacher_temp_warmup_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs, max_warmup_fraction=o.max_warmup_fraction,
        convention=o.schedule_convention,
    )  # fmt: skip
    for note in notes:
        log.warning(note)
    groups = param_groups(student.backbone, student.heads(), o.layer_decay, o.patch_embed_lr_mult)
    optimizer = build_optimizer(groups, o.betas, fused=t.fused_optimizer or None)
    lc = cfg.loss
    k_ibot = cfg.head.ibot_n_prototypes or cfg.head.n_prototypes
    losses = Losses(
        dino=DINOLoss(cfg.head.n_prototypes, lc.student_temp, lc.center_momentum, lc.centering,
                      lc.sinkhorn_iterations).to(device),
        ibot=IBOTPatchLoss(k_ibot if cfg.head.separate_ibot_head else cfg.head.n_prototypes,
                           lc.student_temp, lc.center_momentum, lc.centering,
                           lc.sinkhorn_iterations).to(device),
        koleo=KoLeoLoss(lc.koleo_eps),
    )

    start_step, history = 0, []
    state = load_checkpoint(ckpt_path) if t.resume else None
    if state is not None:
        if fsdp:  # the checkpoint holds plain (unsharded) state, whoever wrote it
            from dinoflow.launch import load_full_state

            load_full_state(student, state["student"], optimizer, state["optimizer"])
            load_full_state(teacher, state["teacher"])
        else:
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            optimizer.load_state_dict(state["optimizer"])
        losses.dino.load_state_dict(state["dino_loss"])
        losses.ibot.load_state_dict(state["ibot_loss"])
        set_rng_state(state["rng"])
        start_step, history = state["step"], state["history"]
        log.info("resuming %s from step %d of %d (checkpoint %s)", fp, start_step, last_step, ckpt_path)
    resumed_from = start_step
    if world_size > 1:
        # the weights are equal on every rank (DDP broadcasts rank 0's); the random streams
        # (drop-path) must not be, or every rank would drop the same paths for its images
        torch.manual_seed((t.seed * 1_000_003 + start_step) * 1_009 + rank)

    model: nn.Module = student
    if world_size > 1 and not fsdp:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    compile_model = t.compile
    if compile_model and device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")):
        log.warning("train.compile: no C++ compiler (g++ or $CXX), which torch.compile needs on "
                    "CPU; training with the eager step")
        compile_model = False
    if compile_model:
        if device.type == "cpu" and t.num_workers > 0:
            log.warning("train.compile with %d loader worker process(es) on CPU: with torch 2.14 "
                        "inside `kedro run` the compiled kernels crashed (SIGSEGV) once a worker "
                        "had been forked; conf/base uses num_workers 0 (docs/performance.md)",
                        t.num_workers)
        model = compile_for_training(model, None if fsdp else teacher)

    augmentation = MultiCropAugmentation(
        global_size=cfg.crops.global_size, local_size=cfg.crops.local_size, n_local=cfg.crops.n_local,
        global_scale=cfg.crops.global_scale, local_scale=cfg.crops.local_scale,
        flip_p=cfg.crops.flip_p, jitter=cfg.crops.jitter, jitter_p=cfg.crops.jitter_p,
        grayscale_p=cfg.crops.grayscale_p, blur_kernel=cfg.crops.blur_kernel,
        blur_sigma=cfg.crops.blur_sigma, blur_p=cfg.crops.blur_p,
        solarize_threshold=cfg.crops.solarize_threshold, solarize_p=cfg.crops.solarize_p,
        mean=tuple(mean), std=tuple(std), reference_blur_bug=cfg.crops.reference_blur_bug,
    )  # fmt: skip
    sampler = StepBatchSampler(n, t.batch_size, rank, world_size, t.seed, start_step, last_step)
    loader = DataLoader(MultiCropDataset(train, augmentation, t.seed), batch_sampler=sampler,
                        collate_fn=MaskingCollate(cfg, rank, world_size), num_workers=t.num_workers,
                        pin_memory=t.pin_memory and device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if t.num_workers else None,
                        # its own generator: the loader must not draw from the global RNG (drop
                        # path), or a resumed run would diverge from an uninterrupted one
                        generator=torch.Generator().manual_seed(t.seed))

    main = rank == 0
    if main:
        tracking.set_tags({"dinoflow.fingerprint": fp, "dinoflow.world_size": world_size})
        tracking.log_text("\n".join(notes) or "no schedule capping", "schedule_notes.txt")
    knn_every = max(1, int(round(t.knn_every_epochs * steps_per_epoch)))

    def knn_check(done: int) -> None:
        if fsdp:  # rank 0 evaluates an unsharded copy of the teacher backbone
            from dinoflow.launch import gather_full_state

            full = gather_full_state(teacher.backbone)[0]
            top1 = torch.zeros(1, dtype=torch.float64, device=device)
            if main:
                with torch.random.fork_rng(devices=[]):
                    backbone = build_backbone(cfg, train.channels).to(device)
                backbone.load_state_dict(full)
                top1 += online_knn(backbone, knn_bank, knn_queries, mean, std,
                                   cfg.crops.global_size, device)
            dist.broadcast(top1, 0)
            acc = float(top1)
        else:
            acc = online_knn(teacher.backbone, knn_bank, knn_queries, mean, std,
                             cfg.crops.global_size, device)
        history.append({"step": done, "knn/top1_k20": acc})
        if main:
            tracking.log_metrics({"knn/top1_k20": acc}, step=done)
            log.info("step %d: online kNN top-1 (k=20) %.4f", done, acc)
        if on_knn is not None:
            on_knn(done, acc)

    has_knn = knn_bank is not None and knn_queries is not None
    if has_knn and start_step == 0:
        knn_check(0)  # the starting point: random init, or the loaded weights
    progress = _progress(main and t.progress, start_step, last_step)
    pending: list[dict[str, torch.Tensor]] = []
    t0, images_done, warned = time.perf_counter(), 0, False
    step = start_step
    final: dict[str, float] = {}
    for batch in loader:
        step = batch["step"]
        teacher.train(False)
        model.train(True)
        try:
            metrics = train_step(batch, step, model, teacher, losses, optimizer, schedules, cfg, device)
        except TrainingDiverged as exc:
            progress.close()
            kept = f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"{exc} ({kept})") from None
        pending.append(metrics)
        images_done += batch["batch_size"] * world_size
        done = step + 1
        if done % t.log_every_steps == 0 or done == last_step:
            final = _reduce(pending)
            pending = []
            final.update({"schedule/lr": float(schedules.lr[step]), "schedule/wd": float(schedules.wd[step]),
                          "schedule/momentum": float(schedules.momentum[step]),
                          "schedule/teacher_temp": float(schedules.teacher_temp[step]),
                          "perf/images_per_second": images_done / (time.perf_counter() - t0)})
            history.append({"step": done, **final})
            if main:
                tracking.log_metrics(final, step=done)
                progress.update(done, final)
            message = collapse_warning(final["monitor/teacher_entropy"], cfg.head.n_prototypes,
                                       cfg.monitor.uniform_entropy_fraction, cfg.monitor.onehot_entropy)
            if message and done >= cfg.monitor.check_after_steps and not warned:
                log.warning("step %d: %s", done, message)
                tracking.set_tags({"dinoflow.collapse_warning": message[:250]})
                warned = True
        if has_knn and (done % knn_every == 0 or done == last_step):
            knn_check(done)
        if done % t.checkpoint_every_steps == 0 or done == last_step:
            if fsdp:  # every rank takes part in gathering the shards; rank 0 writes
                from dinoflow.launch import gather_full_state

                student_sd, optim_sd = gather_full_state(student, optimizer)
                teacher_sd = gather_full_state(teacher)[0]
            elif main:
                student_sd, teacher_sd = student.state_dict(), teacher.state_dict()
                optim_sd = optimizer.state_dict()
            if main:
                atomic_torch_save({
                    "step": done, "student": student_sd, "teacher": teacher_sd,
                    "optimizer": optim_sd, "dino_loss": losses.dino.state_dict(),
                    "ibot_loss": losses.ibot.state_dict(), "rng": rng_state(), "history": history,
                    "config": cfg.model_dump(mode="json"), "fingerprint": fp,
                }, ckpt_path)  # fmt: skip
            if stop_after_steps is not None and done >= stop_after_steps:
                progress.close()
                raise SystemExit(f"stopped after step {done} as asked (checkpoint {ckpt_path})")
    progress.close()
    elapsed = time.perf_counter() - t0
    ips = images_done / elapsed if elapsed > 0 else 0.0

    backbone_path, heads_path = run_dir / "teacher_backbone.pt", run_dir / "teacher_heads.pt"
    export = teacher
    if fsdp:  # gathered on every rank, written from an unsharded copy on rank 0
        from dinoflow.launch import gather_full_state

        teacher_sd = gather_full_state(teacher)[0]
        if main:
            export = make_teacher(build_student(cfg, train.channels))
            export.load_state_dict(teacher_sd)
    if main:
        save_backbone(export.backbone, backbone_path)
        atomic_torch_save({k: m.state_dict() for k, m in export.heads().items()}, heads_path)
        (run_dir / "history.json").write_text(json.dumps(history))
        # DVC plots (dvc.yaml) need records that share their keys: losses and kNN apart
        for name, key in (("history_train.json", "loss/total"), ("history_knn.json", "knn/top1_k20")):
            rows = [h for h in history if key in h]
            common = set.intersection(*(set(h) for h in rows)) if rows else set()
            (run_dir / name).write_text(json.dumps([{k: v for k, v in h.items() if k in common} for h in rows]))
        curve = plot_training_curves(history, run_dir / "training_curves.png")
        tracking.log_artifact(curve, "pretrain")
        tracking.log_text(json.dumps(cfg.model_dump(mode="json"), indent=2), "pretrain/resolved_config.json")
        ckpt_path.unlink(missing_ok=True)  # finished: the exported model is the product
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    knn_history = [h for h in history if "knn/top1_k20" in h]
    return PretrainResult(
        run_dir=str(run_dir), teacher_backbone=str(backbone_path), teacher_heads=str(heads_path),
        steps=last_step, resumed_from_step=resumed_from, final=final, knn_history=knn_history,
        images_per_second=ips, notes=notes, fingerprint=fp, mean=list(mean), std=list(std),
    )  # fmt: skip


def _reduce(pending: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each metric over the steps since the last log and over the processes (one sync
    per log, not per step): the loss of the global batch, as one process would log it."""
    keys = list(pending[0].keys())
    device = pending[0]["loss/total"].device  # the training device (NCCL reduces CUDA tensors)
    means = torch.stack([torch.stack([p[k].float() for p in pending]).mean().to(device) for k in keys])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(means)  # equal local batches: the mean of the means is the global mean
        means /= dist.get_world_size()
    return dict(zip(keys, means.tolist(), strict=True))


@torch.inference_mode()
def online_knn(backbone: DinoVisionTransformer, bank: Split, queries: Split, mean, std, size: int,
               device: torch.device, k: int = 20) -> float:
    """k-NN top-1 (k=20, DINOv2 weighting) of the teacher on a fixed labelled subset."""
    from dinoflow.evaluation.features import extract_features
    from dinoflow.evaluation.knn import knn_classify

    was_training = backbone.training
    backbone.eval()
    feats = [extract_features(backbone, s, size, mean, std, batch_size=256, n_last_blocks=1,
                              device=str(device), progress=False) for s in (bank, queries)]
    backbone.train(was_training)
    n_classes = int(max(bank.labels.max(), queries.labels.max())) + 1
    result = knn_classify(feats[0].cls_last, torch.as_tensor(bank.labels), feats[1].cls_last,
                          torch.as_tensor(queries.labels), n_classes, ks=(k,))
    return float(result[f"top1_k{k}"])


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss terms, teacher entropy, schedules and online kNN over steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("losses", ["loss/total", "loss/dino", "loss/ibot", "loss/koleo"]),
              ("teacher target entropy", ["monitor/teacher_entropy"]),
              ("schedules", ["schedule/teacher_temp", "schedule/momentum"]),
              ("online kNN top-1 (k=20)", ["knn/top1_k20"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key.split("/")[-1], marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _progress:
    """A rich progress bar with loss, images/s and ETA (quiet on other ranks or when disabled)."""

    _active: _progress | None = None  # a run that raised (e.g. a pruned trial) leaves its bar open

    def __init__(self, enabled: bool, start: int, total: int):
        self.bar = None
        if _progress._active is not None:
            _progress._active.close()
        if enabled:
            _progress._active = self
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("pretrain", total=total, completed=start, info="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar:
            info = (f"loss {metrics['loss/total']:.3f} (dino {metrics['loss/dino']:.3f} "
                    f"ibot {metrics['loss/ibot']:.3f} koleo {metrics['loss/koleo']:.3f}) "
                    f"{metrics['perf/images_per_second']:.0f} img/s")
            self.bar.update(self.task, completed=step, info=info)

    def note(self, text: str) -> None:
        if self.bar:
            self.bar.console.log(text)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None


def result_dict(result: PretrainResult) -> dict[str, Any]:
    return asdict(result)


def main(argv: list[str] | None = None) -> None:
    """Cluster entry point: ``torchrun --nproc_per_node=8 -m dinoflow.train --config cfg.json``."""
    from dinoflow.launch import distributed_main

    distributed_main(argv)


if __name__ == "__main__":
    main()
