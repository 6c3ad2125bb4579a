"""Thin node: validated parameters + the curation manifest -> ``dinoflow.jobs.embed.embed_job``."""

from __future__ import annotations

from typing import Any

import pandas as pd

from dinoflow.config import DataConfig, validate
from dinoflow.embeddings import EmbedConfig
from dinoflow.jobs.embed import embed_job


def embed_images(data: dict, embed: dict, curated_manifest: pd.DataFrame | None) -> dict[str, Any]:
    """Embed ``embed.folder`` or, by default, the curated training set; returns the summary."""
    cfg = validate(EmbedConfig, embed, "embed")
    data_cfg = validate(DataConfig, data, "data")
    ids = None if curated_manifest is None else curated_manifest["item_id"].astype(str).tolist()
    return embed_job(cfg, data_cfg, ids)
