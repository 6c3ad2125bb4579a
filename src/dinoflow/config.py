"""Validated configuration: every knob of the method (docs/method.md) is a named value here.

Defaults are the reference recipe (the GPU profile, ``conf/gpu``). The CPU profile
(``conf/base``) and the smoke profile (``conf/smoke``) override some of them in YAML.
Every model forbids unknown keys, so a typo is one clear error naming the key, before any work.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dinoflow.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistillationConfig",
    "ImageCacheConfig",
    "PretrainConfig",
    "Strict",
    "TeacherConfig",
    "deep_merge",
    "fingerprint",
    "validate",
]


class Strict(BaseModel):
    """The one config style: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def fingerprint(config: dict[str, Any]) -> str:
    """Short stable hash of the settings that define a run (a changed setting = a new run)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``override``'s keys replace ``base``'s, nested dicts merged key by key
    (Kedro's "soft" merge of conf/base and another env)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class ImageCacheConfig(Strict):
    """``data.cache``: an image folder stored once at a smaller size (``dinoflow.data.cache``)."""

    # shorter side in px of the stored images; null: off (every read decodes the original).
    # Every consumer then sees the images at this size (smaller ones as they are)
    short_side: int | None = Field(None, ge=32)
    dir: str = "data/02_intermediate/image_cache"  # one sub-folder per short_side
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # build processes; auto: cores


# The image sources ``dinoflow.data.sources`` registers, by their ``data.source`` name, and
# whether each needs ``data.path`` (the folder or the shards it reads). This layer cannot import the data
# layer, so the names are listed here too: tests/test_sources.py checks both lists agree.
SOURCE_NEEDS_PATH: dict[str, bool] = {"fashion_mnist": False, "image_folder": True, "shards": True}


class DataConfig(Strict):
    """Where images come from and how they are split (shared by every pipeline)."""

    source: str = "fashion_mnist"  # a name of SOURCE_NEEDS_PATH (dinoflow.data.sources)
    path: str | None = None
    val_size: int | float = Field(5000, gt=0)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    channels: Literal[1, 3] | None = None  # None: the source's own (1 for Fashion-MNIST, 3 folders)
    allow_download: bool = True
    follow_symlinks_out_of_root: bool = False  # image_folder: include links that leave data.path
    # Keep a fixed random subset (smoke runs, quick experiments); None keeps everything.
    train_limit: int | None = Field(None, ge=10)
    test_limit: int | None = Field(None, ge=10)
    cache: ImageCacheConfig = ImageCacheConfig()  # image_folder (shards: short_side only)

    @field_validator("source")
    @classmethod
    def _registered_source(cls, value: str) -> str:
        if value not in SOURCE_NEEDS_PATH:
            raise ValueError(f"not a registered image source ({', '.join(SOURCE_NEEDS_PATH)})")
        return value

    @model_validator(mode="after")
    def _folder_needs_a_path(self) -> DataConfig:
        # refused before any work: a GPU node must not start on the wrong (or no) images
        if SOURCE_NEEDS_PATH[self.source] and not self.path:
            example = (
                "the shards (--params data.path=/data/shard-{000000..000099}.tar)"
                if self.source == "shards"
                else "the folder of your images (--params data.path=/data/photos)"
            )
            raise ValueError(f"data.path is required with data.source={self.source}: {example}")
        return self


class CropsConfig(Strict):
    """Multi-crop views (docs/method.md section 1)."""

    global_size: int = Field(224, ge=8)
    local_size: int = Field(98, ge=4)  # reference 96 px at patch 16; 98 = 7 x 14 for /14 models
    n_local: int = Field(8, ge=0)
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_kernel: int = Field(9, ge=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, each local
    solarize_threshold: int = Field(128, ge=0, le=255)
    solarize_p: float = Field(0.2, ge=0, le=1)
    reference_blur_bug: bool = False  # reproduce the reference code's inverted 0.0 / 0.9 / 0.5

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"scale range must satisfy 0 < low <= high <= 1, got {v}")
        return v


class BackboneConfig(Strict):
    """The ViT (docs/method.md section 2). ``arch`` picks a size preset; explicit values override it."""

    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant", "custom"] = (
        "vit_small"
    )
    patch_size: int = Field(14, ge=1)
    embed_dim: int | None = Field(None, ge=8)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    num_register_tokens: int = Field(0, ge=0)
    layerscale_init: float = 1e-5
    drop_path_rate: float = Field(0.3, ge=0, lt=1)
    layer_norm_eps: float = 1e-6
    ffn: Literal["mlp", "swiglu"] | None = None  # None: the arch's own (SwiGLU for vit_giant)
    # position embeddings on another grid, as dinov2's arguments of the same names: 0.1 / false
    # (reference training, plain releases); 0.0 / true (register releases; = timm's resample)
    interpolate_offset: float = Field(0.1, ge=0)
    interpolate_antialias: bool = False
    # side in px of the stored position-embedding grid; None: crops.global_size. 518 keeps a
    # release's 37x37 grid, so every crop size is interpolated from it as the release does
    pos_embed_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _custom_needs_sizes(self) -> BackboneConfig:
        if self.arch == "custom" and None in (self.embed_dim, self.depth, self.num_heads):
            raise ValueError("arch=custom needs embed_dim, depth and num_heads")
        if self.embed_dim is not None and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        return self


class HeadConfig(Strict):
    """DINO head and iBOT head (shared by default)."""

    n_prototypes: int = Field(65536, ge=2)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    nlayers: int = Field(3, ge=1)
    separate_ibot_head: bool = False
    ibot_n_prototypes: int | None = Field(None, ge=2)  # separate head only; None: n_prototypes
    # false (DINOv2): the weight-norm magnitude of the prototype layer is trained; true (DINOv1):
    # fixed at 1, unit-norm prototypes
    norm_last_layer: bool = False


class MaskingConfig(Strict):
    """iBOT block masking (docs/method.md section 3)."""

    mask_probability: float = Field(0.5, ge=0, le=1)
    ratio_min: float = Field(0.1, ge=0, le=1)
    ratio_max: float = Field(0.5, ge=0, le=1)
    max_mask_ratio: float = Field(0.5, gt=0, le=1)
    min_num_patches: int = Field(4, ge=1)
    min_aspect: float = Field(0.3, gt=0)
    max_attempts: int = Field(10, ge=1)
    # false (dinov2's MaskingGenerator): once the remaining budget is below min_num_patches,
    # smaller blocks fill it; true: blocks below min_num_patches are rejected (masks then fall
    # short of the requested count more often, docs/faithfulness.md)
    reject_small_blocks: bool = False


class LossConfig(Strict):
    """Loss terms and targets (docs/method.md section 4)."""

    dino_weight: float = Field(1.0, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    centering: Literal["softmax", "sinkhorn_knopp"] = "softmax"
    sinkhorn_iterations: int = Field(3, ge=1)
    koleo_eps: float = Field(1e-8, gt=0)


class GramConfig(Strict):
    """Gram anchoring (DINOv3; ``dinoflow.losses.gram``): from ``first_update_step`` the
    student's patch-similarity matrices are pulled towards those of a Gram teacher, a frozen
    copy of the EMA teacher taken at that step and again every ``update_every`` steps."""

    weight: float = Field(0.0, ge=0)  # 0: off (the DINOv2 objective alone)
    first_update_step: int = Field(0, ge=0)  # the Gram teacher's first copy; the term starts here
    update_every: int | None = Field(None, ge=1)  # null: the first copy is kept to the end


class OptimConfig(Strict):
    """AdamW, layer-wise decay and every schedule (docs/method.md section 5)."""

    base_lr: float = Field(0.004, gt=0)
    lr_scaling: Literal["sqrt", "none"] = "sqrt"  # lr = base_lr * sqrt(global_batch / 1024)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    weight_decay_start: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, ge=0)
    freeze_last_layer_epochs: float = Field(1, ge=0)
    clip_grad: float | None = Field(3.0, gt=0)
    momentum_teacher_start: float = Field(0.992, ge=0, le=1)
    momentum_teacher_end: float = Field(1.0, ge=0, le=1)
    momentum_teacher_shape: Literal["cosine", "linear"] = "cosine"  # start -> end over the run
    teacher_temp_start: float = Field(0.04, gt=0)
    teacher_temp_end: float = Field(0.07, gt=0)
    teacher_temp_warmup_epochs: float = Field(30, ge=0)
    max_warmup_fraction: float = Field(0.3, gt=0, le=1)  # short runs: warm-ups capped to this
    # dinov2: CosineScheduler's ends (the warm-up reaches the peak at its last step, the cosine
    # starts at the peak again and stops one step short of final); exact_ends: the peak once,
    # at the first step after the warm-up, and final reached exactly at the last step
    schedule_convention: Literal["dinov2", "exact_ends"] = "dinov2"


class TrainConfig(Strict):
    """The loop: length, batch, devices, checkpoints, monitoring cadence."""

    epochs: float = Field(100, gt=0)
    steps_per_epoch: int | None = Field(None, ge=1)  # None: real epochs; 1250 = the reference
    max_steps: int | None = Field(None, ge=1)  # stop early (tuning budgets); schedules unchanged
    # wall-clock minutes: train the steps that fit, at most `epochs`' worth (training/budget.py)
    time_budget_min: float | None = Field(None, gt=0)
    batch_size: int = Field(64, ge=1)  # per process
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on CUDA; on a CPU bf16 only with bf16 matrix units and a measured speed-up
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto: CUDA cores per process - 1; CPU 0 for in-memory images, >= 2 for files (loop.py)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    pin_memory: bool = False
    fused_optimizer: bool = False  # fused AdamW (CUDA)
    compile: bool = False
    threads: int | None = Field(None, ge=1)  # torch intra-op threads on CPU; None: torch's default
    use_curated_manifest: bool = True  # train on curation's output when it exists
    # files unreadable at training time are replaced by another image; past this fraction of
    # the train split the run stops (training/data.py UnreadableFiles)
    max_unreadable_fraction: float = Field(0.01, ge=0, le=1)
    run_dir: str = "data/06_models/pretrain"
    checkpoint_every_steps: int = Field(200, ge=1)
    keep_checkpoints: int = Field(
        2, ge=1
    )  # the newest N; an unreadable newest falls back to the next
    resume: bool = True
    log_every_steps: int = Field(10, ge=1)
    knn_every_epochs: float = Field(1, gt=0)
    knn_bank_size: int = Field(5000, ge=10)
    knn_query_size: int = Field(1000, ge=10)
    progress: bool = True


class MonitorConfig(Strict):
    """Collapse detection thresholds (docs/method.md section 7)."""

    uniform_entropy_fraction: float = Field(0.95, gt=0, le=1)  # entropy > this * ln(K): uniform
    onehot_entropy: float = Field(0.05, ge=0)  # mean entropy below this (nats): one-hot
    check_after_steps: int = Field(50, ge=0)


class LauncherConfig(Strict):
    """How processes are started: in process, torchrun (elastic), or SLURM (submitit)."""

    type: Literal["local", "torchrun", "slurm"] = "local"
    nproc_per_node: Annotated[int, Field(ge=1)] | Literal["auto"] = (
        1  # auto: visible GPUs (1 without)
    )
    nnodes: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    master_port: int = Field(29500, ge=1, le=65535)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    partition: str | None = None
    gpus_per_node: int = Field(1, ge=0)
    cpus_per_task: int = Field(10, ge=1)
    timeout_min: int = Field(60 * 24, ge=1)
    slurm_folder: str = "data/09_slurm"


class InitConfig(Strict):
    """Start from weights (continued pretraining) instead of random init."""

    weights: str | None = None  # local file: official DINOv2 layout, timm or dinoflow state dict
    allow_missing: list[str] = []
    head_warmup_steps: int = Field(0, ge=0)  # backbone frozen while heads and centers settle
    head_warmup_backbone_lr_mult: float = Field(0.0, ge=0)  # 0: frozen; >0: a tiny lr instead


class PretrainConfig(Strict):
    crops: CropsConfig = CropsConfig()
    backbone: BackboneConfig = BackboneConfig()
    head: HeadConfig = HeadConfig()
    masking: MaskingConfig = MaskingConfig()
    loss: LossConfig = LossConfig()
    gram: GramConfig = GramConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    launcher: LauncherConfig = LauncherConfig()
    init: InitConfig = InitConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        p = self.backbone.patch_size
        for name, size in (
            ("global_size", self.crops.global_size),
            ("local_size", self.crops.local_size),
        ):
            if size % p:
                raise ValueError(
                    f"crops.{name}={size} is not a multiple of backbone.patch_size={p}"
                )
        pe = self.backbone.pos_embed_size
        if pe is not None and pe % p:
            raise ValueError(
                f"backbone.pos_embed_size={pe} is not a multiple of backbone.patch_size={p}"
            )
        if self.masking.ratio_min > self.masking.ratio_max:
            raise ValueError("masking.ratio_min must be <= masking.ratio_max")
        return self


# --------------------------------------------------------------------------- distillation
class TeacherConfig(Strict):
    """The frozen teacher of a distillation (``distillation.teacher``).

    ``source``: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (a registered
    backbone; its heads are found in the run directory of the pretraining that made it, checked
    bit for bit against the registered weights), a dinoflow run directory (``teacher_backbone.pt``,
    ``teacher_heads.pt``, ``pretrain_summary.json``), or a backbone file: a dinoflow
    ``save_backbone`` file, or a released file in the official DINOv2 layout (local only; then
    ``backbone`` gives its architecture).
    """

    source: str = "models:/dinoflow-backbone@champion"
    heads: str | None = None  # a teacher_heads.pt for a source that has none beside it
    backbone: BackboneConfig | None = None  # a released file's architecture (required for one)
    # a teacher without heads: fit_heads trains fresh DINO/iBOT heads on the frozen backbone
    # first (``fit_steps`` steps of pretraining, backbone lr 0), then distils as with heads;
    # features regresses projections of the student's CLS and patch tokens onto the teacher's
    headless: Literal["fit_heads", "features"] = "fit_heads"
    fit_steps: int = Field(300, ge=1)
    fit_head: HeadConfig = HeadConfig()  # fit_heads: the heads fitted (as pretrain.head)


class StudentBackboneConfig(BackboneConfig):
    """The student's ViT: any size or patch size; no stochastic depth (DINOv2 section 5)."""

    drop_path_rate: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _no_drop_path(self) -> StudentBackboneConfig:
        if self.drop_path_rate:
            raise ValueError(
                f"drop_path_rate={self.drop_path_rate}: DINOv2 distils without "
                "stochastic depth in the student; set it to 0"
            )
        return self


class StudentHeadConfig(HeadConfig):
    """The student's new heads. Prototype counts must be the teacher's: None takes them."""

    n_prototypes: int | None = Field(None, ge=2)  # None: the teacher's
    separate_ibot_head: bool | None = None  # None: as the teacher


class DistillationTrainConfig(TrainConfig):
    run_dir: str = "data/06_models/distillation"


class DistillationConfig(Strict):
    """Distillation (DINOv2 section 5): the pretraining loop with a frozen teacher (backbone and
    heads, eval mode), a spare EMA of the student kept as the final model, no masking and no
    stochastic depth in the student, iBOT on every patch token of the two global crops.

    ``optim.momentum_teacher_*`` is the momentum of the student's EMA; ``optim.teacher_temp_*``
    the temperature of the frozen teacher's targets. With ``teacher.headless=features`` the
    ``loss.dino_weight`` weighs the CLS feature term and ``loss.ibot_weight`` the patch term.
    """

    teacher: TeacherConfig = TeacherConfig()
    backbone: StudentBackboneConfig = StudentBackboneConfig()
    head: StudentHeadConfig = StudentHeadConfig()
    crops: CropsConfig = CropsConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: DistillationTrainConfig = DistillationTrainConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DistillationConfig:
        self.student_config(2, None)  # the crop sizes against the patch size
        return self

    def student_config(self, n_prototypes: int, ibot_prototypes: int | None) -> PretrainConfig:
        """The student as a pretraining config (the builders, loader and logger read it): heads
        with the teacher's prototype counts (``ibot_prototypes``: a separate iBOT head), no masks."""
        head = HeadConfig(
            **{
                **self.head.model_dump(),
                "n_prototypes": n_prototypes,
                "separate_ibot_head": ibot_prototypes is not None,
                "ibot_n_prototypes": ibot_prototypes,
            }
        )
        return PretrainConfig(
            crops=self.crops,
            backbone=BackboneConfig(**self.backbone.model_dump()),
            head=head,
            masking=MaskingConfig(mask_probability=0.0),
            loss=self.loss,
            optim=self.optim,
            train=TrainConfig(**self.train.model_dump()),
            monitor=self.monitor,
        )


_UNION_TAG = re.compile(
    r"^(constrained-|literal\[|function-|lax-|json-or-python)|^(int|str|float|bool|none)$"
)


def validate(model: type[BaseModel], params: dict | None, where: str) -> BaseModel:
    """Validate ``params`` (e.g. Kedro's ``params:pretrain``) into ``model`` with one clear error
    naming every offending key (``pretrain.optim.base_lr: ... (got -1)``)."""
    try:
        return model.model_validate(params or {})
    except ValidationError as exc:
        found: dict[str, list[str]] = {}
        for err in exc.errors():
            # a union's members show up as extra loc parts ("constrained-int", "literal['auto']")
            path = [str(p) for p in err["loc"] if not _UNION_TAG.match(str(p))]
            key = ".".join([where, *path])
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            found.setdefault(key, [])
            if msg + shown not in found[key]:
                found[key].append(msg + shown)
        lines = [f"  {key}: {' or '.join(msgs)}" for key, msgs in found.items()]
        raise ConfigError(f"invalid parameters in {where}:\n" + "\n".join(lines)) from None
