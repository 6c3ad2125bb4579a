"""The embed job: a folder or the curated set -> embeddings parquet, a faiss index, a picture."""

from __future__ import annotations

import json
import logging
from typing import Any

from dinoflow import tracking
from dinoflow.data import load_data
from dinoflow.distributed import resolve_device
from dinoflow.embeddings import EmbedConfig, folder_image_set, run_embedding, split_image_set
from dinoflow.jobs.pretrain import apply_manifest
from dinoflow.serving import load_registered_backbone

log = logging.getLogger(__name__)


def embed_job(cfg: EmbedConfig, data=None, manifest_ids: list[str] | None = None) -> dict[str, Any]:
    """The embed pipeline's job: load ``cfg.model``, embed ``cfg.folder`` or the curated set.

    The curated set is the train split of ``data`` (a DataConfig) restricted to the curation
    manifest's ``manifest_ids`` (the whole train split, with a warning, when there is none).
    Logs the picture and the counts to the active MLflow run when ``cfg.log_to_mlflow``.
    """
    model = load_registered_backbone(cfg.model).to(resolve_device(cfg.device, "embed.device"))
    if cfg.folder:
        images = folder_image_set(cfg.folder, cfg.limit)
    else:
        if data is None:
            raise ValueError("embed: no embed.folder and no data config for the curated set")
        train = load_data(data)["train"]
        if manifest_ids is None:
            log.warning(
                "embed: no curated manifest (data/03_primary/curated_manifest.csv): "
                "embedding the whole train split (run the curation pipeline first)"
            )
        train = apply_manifest(train, manifest_ids)
        images = split_image_set(train, f"curated:{data.source}", cfg.limit)
    summary = run_embedding(model, images, cfg, cfg.model)
    if cfg.log_to_mlflow:
        tracking.log_metrics(
            {
                "embed/n_embedded": summary["n_embedded"],
                "embed/n_skipped": len(summary["skipped"]),
                "embed/dim": summary["dim"],
            }
        )
        if "picture" in summary["files"]:
            tracking.log_artifact(summary["files"]["picture"], "embed")
        tracking.log_text(json.dumps(summary, indent=2), "embed/embed_summary.json")
        tracking.set_tags({"dinoflow.embedded_model": cfg.model[:250]})
    return summary
