"""Thin node: validated parameters + the curated manifest -> ``dinoflow.jobs.tune.run_study``."""

from __future__ import annotations

from typing import Any

import pandas as pd

from dinoflow.config import DataConfig, PretrainConfig, validate


def tune(data: dict, pretrain: dict, tuning: dict, curated_manifest: pd.DataFrame | None) -> dict[str, Any]:
    """Run or resume the study; returns its summary (best trial, params file, plots, trial states)."""
    from dinoflow.jobs.tune import run_study
    from dinoflow.tuning import TuningConfig

    data_cfg = validate(DataConfig, data, "data")
    base = validate(PretrainConfig, pretrain, "pretrain")
    tuning_cfg = validate(TuningConfig, tuning, "tuning")
    manifest_ids = None if curated_manifest is None else curated_manifest["item_id"].astype(str).tolist()
    return run_study(data_cfg, base, tuning_cfg, manifest_ids)
