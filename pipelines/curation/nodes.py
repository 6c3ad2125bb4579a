"""Thin Kedro nodes over ``dinoflow.curation``: validated parameters in, library calls out.

``load_curation_splits`` lists or reads the images once; the splits travel to the other nodes
as ``curation_splits``, an in-memory dataset that hands the same object on (no copy of the
pixels). Each node validates its parameters (cheap), and a caller with splits of its own (a
notebook, the tests) runs the pipeline ``from_inputs("curation_splits")``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow import curation
from dinoflow.config import DataConfig, validate
from dinoflow.data import Split
from dinoflow.data.cache import build_for_data


def build_image_cache(data: dict) -> dict:
    """``data.cache``: the folder's images stored once at ``short_side`` px (only new or changed
    files are read); its counts, or ``{"short_side": None}`` when the cache is off. The folder
    exists either way: DVC keeps it as an output of this stage."""
    cfg = validate(DataConfig, data, "data")
    Path(cfg.cache.dir).mkdir(parents=True, exist_ok=True)
    report = build_for_data(cfg)
    return report.as_dict() if report is not None else {"short_side": None}


def load_curation_splits(data: dict, image_cache: dict | None = None) -> dict[str, Split]:
    """The train/val/test splits every pipeline uses (``curation.load_splits``). ``image_cache``
    (the report of ``build_image_cache``) only orders this node after the build."""
    del image_cache
    return curation.load_splits(validate(DataConfig, data, "data"))


def ingest_images(splits: dict[str, Split], params: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """Decode every train/val/test image safely: metadata table and pixel thumbnails."""
    return curation.ingest(splits, curation.curation_config(params))


def validate_images(metadata: pd.DataFrame, splits: dict[str, Split], params: dict) -> dict:
    """Great Expectations suite + Data Docs; stops the run when a must-hold check fails."""
    return curation.validate(metadata, len(splits["train"].class_names), curation.curation_config(params))


def filter_quality(metadata: pd.DataFrame, validation: dict, params: dict) -> pd.DataFrame:
    """Quality reasons (runs after validation passed: ``validation`` orders the nodes)."""
    del validation
    return curation.quality(metadata, curation.curation_config(params))


def embed_images(metadata: pd.DataFrame, thumbnails: np.ndarray, splits: dict[str, Split],
                 params: dict) -> tuple[np.ndarray, dict]:
    """(N, D) embeddings by the configured embedder (pixels + PCA, dinoflow, timm), and the
    stage's timing for the report."""
    return curation.embed(metadata, thumbnails, splits, curation.curation_config(params))


def deduplicate_images(metadata: pd.DataFrame, embeddings: np.ndarray, params: dict) -> pd.DataFrame:
    """Exact duplicates, eval decontamination (whole components), near duplicates."""
    return curation.deduplicate(metadata, embeddings, curation.curation_config(params))


def sample_balanced(
    metadata: pd.DataFrame, embeddings: np.ndarray, params: dict
) -> tuple[pd.DataFrame, dict]:
    """Hierarchical k-means with resampling and balanced sampling to the target size."""
    return curation.balanced_sampling(metadata, embeddings, curation.curation_config(params))


def write_outputs(
    metadata: pd.DataFrame, validation: dict, balance: dict, splits: dict[str, Split],
    embed_timing: dict, params: dict,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Curated manifest, quarantine list and report (PNGs, JSON, MLflow if a run is active)."""
    cfg = curation.curation_config(params)
    return curation.outputs(metadata, validation, balance, splits, embed_timing, cfg)