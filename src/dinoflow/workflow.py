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
