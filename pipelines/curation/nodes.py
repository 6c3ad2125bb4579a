"""Thin Kedro nodes over ``dinoflow.curation``: validated parameters in, library calls out.

Each node re-validates its parameters (cheap) so that any node can run on its own
(``kedro run --pipelines=curation --from-nodes=...``). Splits are reloaded where pixels are needed
(listing a folder or reading the IDX files takes about a second) rather than passed between
nodes, which would deep-copy every image array through Kedro's memory datasets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dinoflow import curation
from dinoflow.config import DataConfig, validate
from dinoflow.data import Split
from dinoflow.workflow import load_data


def _splits(data: dict) -> tuple[dict[str, Split], str | None]:
    cfg = validate(DataConfig, data, "data")
    splits = load_data(cfg)
    return splits, (cfg.path if cfg.source == "image_folder" else None)


def ingest_images(data: dict, params: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """Decode every train/val/test image safely: metadata table and pixel thumbnails."""
    cfg = curation.curation_config(params)
    splits, _ = _splits(data)
    return curation.ingest(splits, cfg)


def validate_images(metadata: pd.DataFrame, data: dict, params: dict) -> dict:
    """Great Expectations suite + Data Docs; stops the run when a must-hold check fails."""
    cfg = curation.curation_config(params)
    splits, _ = _splits(data)
    return curation.validate(metadata, len(splits["train"].class_names), cfg)


def filter_quality(metadata: pd.DataFrame, validation: dict, params: dict) -> pd.DataFrame:
    """Quality reasons (runs after validation passed: ``validation`` orders the nodes)."""
    del validation
    return curation.quality(metadata, curation.curation_config(params))


def embed_images(metadata: pd.DataFrame, thumbnails: np.ndarray, data: dict, params: dict) -> np.ndarray:
    """(N, D) embeddings by the configured embedder (pixels + PCA, dinoflow, timm)."""
    cfg = curation.curation_config(params)
    splits = None if cfg.embedding.kind == "pixels" else _splits(data)[0]
    return curation.embed(metadata, thumbnails, splits, cfg)


def deduplicate_images(metadata: pd.DataFrame, embeddings: np.ndarray, params: dict) -> pd.DataFrame:
    """Exact duplicates, eval decontamination (whole components), near duplicates."""
    return curation.deduplicate(metadata, embeddings, curation.curation_config(params))


def sample_balanced(
    metadata: pd.DataFrame, embeddings: np.ndarray, params: dict
) -> tuple[pd.DataFrame, dict]:
    """Hierarchical k-means with resampling and balanced sampling to the target size."""
    return curation.balanced_sampling(metadata, embeddings, curation.curation_config(params))


def write_outputs(
    metadata: pd.DataFrame, validation: dict, balance: dict, data: dict, params: dict
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Curated manifest, quarantine list and report (PNGs, JSON, MLflow if a run is active)."""
    from dinoflow.curation.report import build_report

    cfg = curation.curation_config(params)
    splits, root = _splits(data)
    manifest = curation.manifest_of(metadata)
    quarantine = curation.quarantine_of(metadata, root)
    report = build_report(metadata, quarantine, validation, balance, splits, cfg)
    return manifest, quarantine, report
