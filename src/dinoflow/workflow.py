"""The library's top-level jobs: what a pipeline node (or a cluster entry point) calls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from dinoflow.config import DataConfig, PretrainConfig
from dinoflow.data import Split, channel_stats, load_splits

log = logging.getLogger(__name__)


def load_data(data: DataConfig) -> dict[str, Split]:
    return load_splits(source=data.source, path=data.path, val_size=data.val_size,
                       test_fraction=data.test_fraction, seed=data.seed, channels=data.channels,
                       allow_download=data.allow_download, train_limit=data.train_limit,
                       test_limit=data.test_limit)


def apply_manifest(train: Split, manifest_ids: list[str] | None) -> Split:
    """Keep the train items curation kept (all of them when there is no manifest)."""
    if manifest_ids is None:
        return train
    keep = set(manifest_ids)
    rows = [i for i, item in enumerate(train.ids) if item in keep]
    if not rows:
        raise ValueError("curated manifest: none of its item_ids is in the train split "
                         "(was it made from another data source? re-run the curation pipeline)")
    log.info("training on the curated set: %d of %d train images", len(rows), len(train))
    return train.subset(rows)


def knn_subsets(splits: dict[str, Split], bank_size: int, query_size: int, seed: int) -> tuple[Split, Split] | tuple[None, None]:
    """Fixed labelled subsets for the online kNN check: a train bank and val queries."""
    train, val = splits["train"], splits["val"]
    if not (train.labelled and val.labelled and len(val)):
        return None, None
    rng = np.random.default_rng(seed)
    bank = np.sort(rng.permutation(len(train))[: min(bank_size, len(train))])
    queries = np.sort(rng.permutation(len(val))[: min(query_size, len(val))])
    return train.subset(bank), val.subset(queries)


def run_pretraining(data: DataConfig, cfg: PretrainConfig, manifest_ids: list[str] | None = None,
                    stop_after_steps: int | None = None,
                    on_knn: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Load the data, train, and return a JSON-able summary (paths, steps, losses, kNN, speed).

    ``on_knn(step, top1)`` is passed to ``pretrain`` (tuning reports it to its pruner).
    """
    from dinoflow.train import pretrain

    splits = load_data(data)
    train = apply_manifest(splits["train"], manifest_ids if cfg.train.use_curated_manifest else None)
    mean, std = channel_stats(train)
    bank, queries = knn_subsets(splits, cfg.train.knn_bank_size, cfg.train.knn_query_size, cfg.train.seed)
    result = pretrain(cfg, train, mean, std, bank, queries, stop_after_steps=stop_after_steps,
                      on_knn=on_knn)
    summary = asdict(result)
    summary.update({"n_train_images": len(train), "data": data.model_dump(mode="json"),
                    "channels": train.channels, "image_size": cfg.crops.global_size})
    try:
        import mlflow

        run = mlflow.active_run()
        summary["mlflow_run_id"] = run.info.run_id if run else None
    except Exception:  # noqa: BLE001
        summary["mlflow_run_id"] = None
    return summary


def split_identity(split: Split) -> str:
    """A short hash of a split's item ids: "the same evaluation data" for champion comparisons."""
    import hashlib

    return hashlib.sha256("\n".join(split.ids).encode()).hexdigest()[:16]


def load_model_for_evaluation(model: str | None, pretrain_summary: dict | None):
    """(backbone, info) from a registered-model URI, a checkpoint path, or pretrain's summary.

    info: {"source", "mean", "std", "image_size", "pretrain_run_id"} (None where unknown).
    """
    import torch

    from dinoflow.models.vit import DinoVisionTransformer, load_backbone

    summary = pretrain_summary or {}
    info: dict[str, Any] = {"mean": summary.get("mean"), "std": summary.get("std"),
                            "image_size": summary.get("image_size"),
                            "pretrain_run_id": summary.get("mlflow_run_id")}
    source = model or summary.get("teacher_backbone")
    if not source:
        raise ValueError("evaluation.model: no model to evaluate. Run the pretrain pipeline first, or "
                         "pass --params evaluation.model=<checkpoint path or models:/name@alias>")
    info["source"] = str(source)
    if str(source).startswith(("models:/", "runs:/")):
        import mlflow

        wrapper = mlflow.pytorch.load_model(str(source), map_location="cpu")
        backbone = getattr(wrapper, "backbone", wrapper)
        for key in ("mean", "std", "image_size"):
            if getattr(wrapper, key, None) is not None:
                info[key] = list(getattr(wrapper, key)) if key != "image_size" else int(wrapper.image_size)
        if not isinstance(backbone, DinoVisionTransformer):
            raise ValueError(f"evaluation.model: {source} does not hold a dinoflow backbone")
        return backbone.eval(), info
    from pathlib import Path

    if not Path(source).is_file():
        raise FileNotFoundError(f"evaluation.model: checkpoint {source} does not exist")
    with torch.no_grad():
        backbone = load_backbone(source)
    return backbone.eval(), info


def run_evaluation(data: DataConfig, params: dict[str, Any], pretrain_summary: dict | None,
                   out_dir: str = "data/08_reporting") -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate a teacher backbone: label-free metrics always; kNN, linear, segmentation with labels;
    baselines and pictures.

    Returns (metrics for metrics.json, report with details, files and provenance; ``labelled``
    says whether the labelled metrics could be computed).
    """
    from dataclasses import fields

    from dinoflow.evaluation.metric_spec import splits_are_labelled
    from dinoflow.evaluation.report import EvalSettings, evaluate_backbone
    from dinoflow.models.vit import DinoVisionTransformer

    params = dict(params or {})
    model = params.pop("model", None)
    known = {f.name for f in fields(EvalSettings)} - {"out_dir", "mean", "std"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"invalid parameters in evaluation: unknown key(s) {', '.join('evaluation.' + k for k in unknown)}")
    backbone, info = load_model_for_evaluation(model, pretrain_summary)
    splits = load_data(data)
    if info["mean"] is None or info["std"] is None:
        info["mean"], info["std"] = channel_stats(splits["train"])
    if params.get("image_size") is None and info.get("image_size"):
        params["image_size"] = int(info["image_size"])
    from pydantic import TypeAdapter, ValidationError

    try:
        settings = TypeAdapter(EvalSettings).validate_python(
            {**params, "out_dir": out_dir, "mean": info["mean"], "std": info["std"]})
    except ValidationError as exc:
        lines = [f"  evaluation.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                 for e in exc.errors()]
        raise ValueError("invalid parameters in evaluation:\n" + "\n".join(lines)) from None
    kwargs = backbone.backbone_kwargs()
    metrics, files = evaluate_backbone(backbone, splits, settings,
                                       random_backbone_factory=lambda: DinoVisionTransformer(**kwargs))
    report = {
        "model": info["source"], "pretrain_run_id": info["pretrain_run_id"],
        "labelled": splits_are_labelled(splits),
        "eval_data_id": split_identity(splits["test"]), "val_data_id": split_identity(splits["val"]),
        "data": data.model_dump(mode="json"), "files": {k: str(v) for k, v in files.items()},
        "metrics": metrics,
    }
    return metrics, report
