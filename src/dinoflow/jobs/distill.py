"""The distillation job: load the teacher (registry, run directory or file), fit its heads when
it has none, distil (one writer per run directory), evaluate student and teacher with the
evaluation job's code, register the student as ``dinoflow-backbone-distilled``."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinoflow import tracking
from dinoflow.artifacts import ModelArtifact, ModelLoadError, load_model
from dinoflow.config import (
    BackboneConfig,
    ConfigError,
    DataConfig,
    DistillationConfig,
    InitConfig,
    PretrainConfig,
    TeacherConfig,
    TrainConfig,
    fingerprint,
)
from dinoflow.data import Split, channel_stats, load_data
from dinoflow.errors import DataError
from dinoflow.files import FolderLock, atomic_write_json
from dinoflow.methods.frozen_teacher import FrozenTeacher, heads_from_state
from dinoflow.models.vit import DinoVisionTransformer, save_backbone
from dinoflow.results import DistillationSummary, EvaluationReport, PretrainSummary
from dinoflow.training.distill import distill

log = logging.getLogger(__name__)

__all__ = [
    "TeacherSource",
    "evaluate_distillation",
    "load_teacher",
    "register_distillation",
    "run_distillation",
]

DISTILLED_MODEL_NAME = "dinoflow-backbone-distilled"
TAG_DISTILLED_INTO = "dinoflow.distilled_into"  # on the teacher's version and run


@dataclass
class TeacherSource:
    """A loaded teacher: backbone, heads (None: headless) and where it came from.

    info: source (as given), uri (pinned: ``models:/name/<version>``, a directory or a file),
    model_name, version, run_id (the MLflow run that trained it), heads (the file or "none").
    """

    backbone: DinoVisionTransformer
    heads: tuple[nn.Module, nn.Module | None] | None
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def frozen(self) -> FrozenTeacher:
        dino, ibot = self.heads if self.heads is not None else (None, None)
        return FrozenTeacher(self.backbone, dino, ibot)


# --------------------------------------------------------------------------- the teacher
def _load_heads(path: str | Path, backbone: DinoVisionTransformer, key: str):
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    return heads_from_state(
        torch.load(path, map_location="cpu", weights_only=True), backbone.embed_dim
    )


def _version_of_run(run_id: str | None, fp: str | None) -> dict[str, str]:
    """{model_name, version}: the newest registered ``dinoflow-backbone`` version made by pretrain
    run ``run_id`` with fingerprint ``fp`` (lineage for a run-directory teacher); {} if none."""
    from dinoflow.registry import MODEL_NAME

    if not run_id:
        return {}
    try:
        from mlflow import MlflowClient

        found = MlflowClient().search_model_versions(
            f"name = '{MODEL_NAME}' and tags.`dinoflow.pretrain_run_id` = '{run_id}'"
        )
    except Exception:  # noqa: BLE001 - no registry here: the run id is the lineage
        return {}
    same = [v for v in found if not fp or v.tags.get("dinoflow.fingerprint") == fp]
    if not same:
        return {}
    newest = max(same, key=lambda v: int(v.version))
    return {"model_name": MODEL_NAME, "version": str(newest.version)}


def _teacher_artifact(tcfg: TeacherConfig, in_chans: int, global_size: int) -> ModelArtifact:
    """``dinoflow.artifacts.load_model`` on ``teacher.source``; a released file is loaded into
    ``teacher.backbone``. A source that cannot be loaded is a ConfigError naming the key."""
    from dinoflow.methods.dinov2 import backbone_from_config

    def architecture() -> DinoVisionTransformer:
        with torch.random.fork_rng(devices=[]):
            return backbone_from_config(tcfg.backbone, global_size, in_chans)

    try:
        return load_model(
            tcfg.source,
            key="distillation.teacher.source",
            find_heads=not tcfg.heads,
            architecture=architecture if tcfg.backbone is not None else None,
        )
    except ModelLoadError as exc:
        if exc.kind == "released" and tcfg.backbone is None:
            raise ConfigError(
                f"distillation.teacher.backbone: {tcfg.source} is a released weights "
                "file; give its architecture (arch or embed_dim/depth/num_heads, "
                "patch_size)"
            ) from None
        raise ConfigError(str(exc)) from None


def load_teacher(tcfg: TeacherConfig, in_chans: int, global_size: int) -> TeacherSource:
    """The teacher ``distillation.teacher`` names (any source ``dinoflow.artifacts.load_model``
    takes: a registered version, a run directory, a backbone or released file), with its heads
    where it has them (``teacher.heads``, else its run directory's)."""
    artifact = _teacher_artifact(tcfg, in_chans, global_size)
    heads_path = tcfg.heads or artifact.heads_file
    heads = (
        _load_heads(heads_path, artifact.backbone, "distillation.teacher.heads")
        if heads_path
        else None
    )
    info: dict[str, Any] = {"source": tcfg.source, "uri": artifact.uri}
    if artifact.kind == "registered":
        info.update(model_name=artifact.model_name, version=artifact.version)
    if artifact.kind in ("registered", "run_dir"):
        info["run_id"] = artifact.run_id
    info["heads"] = str(heads_path) if heads_path else "none"
    if artifact.kind == "run_dir":
        info.update(_version_of_run(artifact.run_id, artifact.fingerprint))
    return TeacherSource(
        artifact.backbone, heads, artifact.mean, artifact.std, artifact.image_size, info
    )


def _head_fit_config(
    cfg: DistillationConfig, kw: dict[str, Any], fit_dir: Path, init: Path
) -> PretrainConfig:
    """The pretraining that fits the heads: the teacher's architecture (``kw``, its constructor
    kwargs) from ``init``, ``teacher.fit_steps`` steps with the backbone's lr at 0."""
    return PretrainConfig(
        crops=cfg.crops,
        loss=cfg.loss,
        optim=cfg.optim,
        monitor=cfg.monitor,
        backbone=BackboneConfig(
            arch="custom",
            patch_size=kw["patch_size"],
            embed_dim=kw["embed_dim"],
            depth=kw["depth"],
            num_heads=kw["num_heads"],
            mlp_ratio=kw["mlp_ratio"],
            num_register_tokens=kw["num_register_tokens"],
            layerscale_init=kw["layerscale_init"] or 0.0,
            drop_path_rate=0.0,
            layer_norm_eps=kw["layer_norm_eps"],
            ffn=kw["ffn"],
            interpolate_offset=kw["interpolate_offset"],
            interpolate_antialias=kw["interpolate_antialias"],
            pos_embed_size=kw["img_size"],
        ),
        head=cfg.teacher.fit_head,
        train=TrainConfig(
            **{
                **cfg.train.model_dump(),
                "epochs": 1,
                "max_steps": None,
                "steps_per_epoch": cfg.teacher.fit_steps,
                "run_dir": str(fit_dir),
            }
        ),
        init=InitConfig(weights=str(init), head_warmup_steps=cfg.teacher.fit_steps),
    )


def fit_teacher_heads(
    cfg: DistillationConfig,
    teacher: TeacherSource,
    train: Split,
    mean: list[float],
    std: list[float],
) -> TeacherSource:
    """Fresh heads for a headless teacher: ``teacher.fit_steps`` steps of DINOv2 pretraining with
    the backbone's lr at 0 (``pretrain.init.head_warmup_*``); the EMA's heads are kept. A fit
    that finished before (same settings and backbone) is reused; a killed one resumes."""
    from dinoflow.training import pretrain, total_steps_for

    fit_dir = Path(cfg.train.run_dir) / "teacher_heads_fit"
    init = fit_dir / "init_backbone.pt"
    save_backbone(teacher.backbone, init)
    pcfg = _head_fit_config(cfg, teacher.backbone.backbone_kwargs(), fit_dir, init)
    key = fingerprint(
        {
            "fit": pcfg.model_dump(mode="json"),
            "teacher": teacher.frozen().digest(),
            "n": len(train),
            "steps": total_steps_for(pcfg, len(train), 1)[0],
        }
    )
    done, heads_file = fit_dir / "fit.json", fit_dir / "teacher_heads.pt"
    if not (
        done.is_file() and json.loads(done.read_text()).get("key") == key and heads_file.is_file()
    ):
        log.info(
            "the teacher has no heads: fitting them for %d steps on the frozen backbone",
            cfg.teacher.fit_steps,
        )
        with nested_run("teacher heads fit"):
            pretrain(pcfg, train, mean, std)
        atomic_write_json(done, {"key": key})
    heads = heads_from_state(torch.load(heads_file, weights_only=True), teacher.backbone.embed_dim)
    return TeacherSource(
        teacher.backbone,
        heads,
        teacher.mean,
        teacher.std,
        teacher.image_size,
        {**teacher.info, "heads": f"fitted: {heads_file}"},
    )


@contextlib.contextmanager
def nested_run(name: str) -> Iterator[None]:
    """A nested MLflow run while an outer one is active (the head fit's curves apart)."""
    try:
        import mlflow
    except ImportError:  # untracked
        yield
        return
    if mlflow.active_run() is None:
        yield
        return
    with mlflow.start_run(run_name=name, nested=True):
        yield


# --------------------------------------------------------------------------- the jobs
def run_distillation(
    data: DataConfig,
    cfg: DistillationConfig,
    manifest_ids: list[str] | None = None,
    stop_after_steps: int | None = None,
) -> DistillationSummary:
    """Load the data and the teacher, fit heads if needed, distil; one writer per run directory."""
    from dinoflow.jobs.pretrain import apply_manifest, knn_subsets

    splits = load_data(data)
    train = apply_manifest(
        splits["train"], manifest_ids if cfg.train.use_curated_manifest else None
    )
    source = load_teacher(cfg.teacher, train.channels, cfg.crops.global_size)
    if source.mean is None or source.std is None:  # a file: the data's normalisation
        source.mean, source.std = channel_stats(train)
    if int(source.backbone.in_chans) != train.channels:
        raise DataError(
            f"distillation.teacher: the teacher takes {source.backbone.in_chans}-channel "
            f"images, the data has {train.channels} (set data.channels)"
        )
    mode = "heads" if source.heads is not None else cfg.teacher.headless
    t = cfg.train
    bank, queries = knn_subsets(splits, t.knn_bank_size, t.knn_query_size, t.seed)
    with FolderLock(Path(t.run_dir), "distillation"):
        if mode == "fit_heads":
            source = fit_teacher_heads(cfg, source, train, source.mean, source.std)
        info = {**source.info, "mode": "features" if mode == "features" else "heads"}
        summary = distill(
            cfg,
            source.frozen(),
            train,
            source.mean,
            source.std,
            bank,
            queries,
            stop_after_steps,
            teacher_info=info,
        )
    return summary.model_copy(
        update={
            "n_train_images": len(train),
            "data": data.model_dump(mode="json"),
            "mlflow_run_id": tracking.active_run_id(),
        }
    )


def _student(summary: DistillationSummary) -> DinoVisionTransformer:
    return load_model(
        summary.student_backbone, key="distillation_summary.student_backbone"
    ).backbone


def evaluate_distillation(
    data: DataConfig,
    params: dict[str, Any],
    cfg: DistillationConfig,
    summary: DistillationSummary,
    out_dir: str | Path,
) -> tuple[dict[str, float], EvaluationReport]:
    """The student and its teacher through ``run_evaluation`` (the evaluation pipeline's code and
    settings): the student's keys, the teacher's prefixed ``teacher_``; the report is the
    student's with the teacher's report, the FLOPs and the ratios added."""
    from dinoflow.jobs.evaluate import run_evaluation

    params = {k: v for k, v in (params or {}).items() if k != "model"}
    out_dir = Path(out_dir)
    student = _student(summary)
    metrics, report = run_evaluation(
        data, params, summary.as_pretrain_summary(), student, str(out_dir / "student")
    )
    pinned = cfg.teacher.model_copy(
        update={"source": summary.teacher.get("uri") or cfg.teacher.source}
    )
    teacher = load_teacher(pinned, summary.channels, summary.image_size).backbone
    as_pretrain = PretrainSummary(
        run_dir="",
        teacher_backbone=str(pinned.source),
        teacher_heads="",
        steps=0,
        mean=summary.mean,
        std=summary.std,
        image_size=summary.image_size,
        channels=summary.channels,
        mlflow_run_id=summary.teacher.get("run_id"),
    )
    # the baselines (random weights, raw pixels) are the student's; the teacher needs none
    t_metrics, t_report = run_evaluation(
        data, {**params, "baselines": []}, as_pretrain, teacher, str(out_dir / "teacher")
    )
    metrics.update({f"teacher_{k}": v for k, v in t_metrics.items()})
    ratios = {"flops_ratio": summary.student_flops / max(summary.teacher_flops, 1)}
    if t_metrics.get("knn_top1"):
        ratios["knn_top1_kept"] = metrics["knn_top1"] / t_metrics["knn_top1"]
    report = report.model_copy(
        update={
            "teacher": summary.teacher,
            "teacher_report": t_report.model_dump(mode="json"),
            "student_flops": summary.student_flops,
            "teacher_flops": summary.teacher_flops,
            **ratios,
        }
    )
    return metrics, report


def distillation_card(summary: DistillationSummary, metrics: dict[str, Any]) -> str:
    """The model card's distillation section: the teacher, the FLOPs, both sets of numbers."""
    t = summary.teacher
    keys = sorted(k for k in metrics if f"teacher_{k}" in metrics and not k.startswith("seg_iou_"))
    lines = [
        "## Distillation",
        "",
        f"- teacher: `{t.get('uri') or t.get('source')}` (given as `{t.get('source')}`), model "
        f"version `{t.get('model_name', '-')}/{t.get('version', '-')}`, run `{t.get('run_id')}`, "
        f"heads: {t.get('heads')}",
        f"- method: {summary.mode} (DINOv2 section 5: frozen teacher, student EMA kept, no masking "
        "and no stochastic depth, iBOT on every patch of both global crops)",
        f"- FLOPs per image at {summary.image_size} px: student {summary.student_flops:,}, "
        f"teacher {summary.teacher_flops:,} "
        f"({summary.student_flops / max(summary.teacher_flops, 1):.3f} of the teacher's)",
        f"- distillation: {summary.steps} steps, {summary.train_seconds:.0f} s, "
        f"{summary.images_per_second:.1f} images/s",
        "",
        "| metric | student | teacher | kept |",
        "|---|---|---|---|",
        *(
            f"| {k} | {metrics[k]:.4f} | {metrics['teacher_' + k]:.4f} | "
            f"{metrics[k] / metrics['teacher_' + k]:.1%} |"
            if metrics["teacher_" + k]
            else f"| {k} | {metrics[k]:.4f} | {metrics['teacher_' + k]:.4f} | - |"
            for k in keys
        ),
        "",
    ]
    return "\n".join(lines)


def register_distillation(
    summary: DistillationSummary,
    metrics: dict[str, Any],
    report: EvaluationReport | None,
    reg_cfg,
    git_commit: str = "unknown",
) -> dict:
    """Register the student (the registration job's code, its model name), promoted by the same
    rule; tagged with its teacher's version and run, which are tagged back with the student."""
    from mlflow import MlflowClient

    from dinoflow.registry import register_pretrained

    t = summary.teacher
    tags = {
        "dinoflow.distillation_mode": summary.mode,
        "dinoflow.teacher_source": t.get("source"),
        "dinoflow.teacher_uri": t.get("uri"),
        "dinoflow.teacher_model_name": t.get("model_name"),
        "dinoflow.teacher_version": t.get("version"),
        "dinoflow.teacher_run_id": t.get("run_id"),
        "dinoflow.student_flops": summary.student_flops,
        "dinoflow.teacher_flops": summary.teacher_flops,
    }
    tags = {k: str(v) for k, v in tags.items() if v not in (None, "")}
    # the card's metric table: the student's; its distillation section sets the teacher's beside
    own = {k: v for k, v in metrics.items() if not k.startswith("teacher_")}
    decision = register_pretrained(
        summary.as_pretrain_summary(),
        own,
        reg_cfg,
        git_commit,
        report,
        _student(summary),
        extra_tags=tags,
        card_extra=distillation_card(summary, metrics),
    )
    student = f"{reg_cfg.model_name}/{decision['version']}"
    client = MlflowClient()
    if t.get("model_name") and t.get("version"):
        mv = client.get_model_version(t["model_name"], t["version"])
        client.set_model_version_tag(
            t["model_name"],
            t["version"],
            TAG_DISTILLED_INTO,
            _appended(mv.tags.get(TAG_DISTILLED_INTO), student),
        )
    if t.get("run_id"):
        try:
            run = client.get_run(t["run_id"])
            client.set_tag(
                t["run_id"],
                TAG_DISTILLED_INTO,
                _appended(run.data.tags.get(TAG_DISTILLED_INTO), student),
            )
        except Exception:  # noqa: BLE001 - the teacher's run may live in another store
            log.warning("the teacher's run %s is not in this tracking store", t["run_id"])
    return decision


def _appended(existing: str | None, item: str) -> str:
    items = [i for i in (existing or "").split(",") if i]
    return ",".join(items + ([item] if item not in items else []))
