"""The pretrain job: the data, the curated subset, the normalisation, one writer, the loop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dinoflow import tracking
from dinoflow.config import DataConfig, PretrainConfig
from dinoflow.data import Split, channel_stats, load_data
from dinoflow.distributed import is_main_process
from dinoflow.errors import DataError
from dinoflow.files import FolderLock, atomic_write_json
from dinoflow.results import PretrainSummary
from dinoflow.training import pretrain

log = logging.getLogger(__name__)


def apply_manifest(train: Split, manifest_ids: list[str] | None) -> Split:
    """Keep the train items curation kept (all of them when there is no manifest)."""
    if manifest_ids is None:
        return train
    keep = set(manifest_ids)
    rows = [i for i, item in enumerate(train.ids) if item in keep]
    if not rows:
        raise DataError(
            "curated manifest: none of its item_ids is in the train split "
            "(was it made from another data source? re-run the curation pipeline)"
        )
    log.info("training on the curated set: %d of %d train images", len(rows), len(train))
    return train.subset(rows)


SMALL_CROPS = 64  # global crops below this are a profile for small images (conf/base: 28 px)
MUCH_LARGER = 4  # images whose shorter side is this many times the crop lose most of their detail


def warn_if_images_dwarf_the_crops(
    train: Split, cfg: PretrainConfig, sample: int = 16
) -> str | None:
    """One warning, before training, when a small-crop profile (conf/base, made for 28-px
    Fashion-MNIST) meets photos: the median shorter side of a fixed sample of the files (headers
    only, nothing decoded) against the global crop size. Returns the warning (None: none)."""
    from PIL import Image

    crop = cfg.crops.global_size
    if train.paths is None or crop >= SMALL_CROPS or not len(train):
        return None
    rows = np.random.default_rng(0).permutation(len(train))[:sample]
    sides = []
    for i in rows:
        try:
            with Image.open(train.paths[i]) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):
            continue  # unreadable files are the loader's to report
    if not sides or np.median(sides) < MUCH_LARGER * crop:
        return None
    message = (
        f"the images of data.path have a median shorter side of {int(np.median(sides))} px "
        f"({len(sides)} sampled), {np.median(sides) / crop:.0f}x this profile's {crop}-px "
        "global crops (conf/base is made for 28-px Fashion-MNIST): for photos use "
        "`kedro run --env photos --params data.path=...` on a CPU or `--env gpu` on GPUs"
    )
    log.warning(message)
    return message


def knn_subsets(
    splits: dict[str, Split], bank_size: int, query_size: int, seed: int
) -> tuple[Split, Split] | tuple[None, None]:
    """Fixed labelled subsets for the online kNN check: a train bank and val queries."""
    train, val = splits["train"], splits["val"]
    if not (train.labelled and val.labelled and len(val)):
        return None, None
    rng = np.random.default_rng(seed)
    bank = np.sort(rng.permutation(len(train))[: min(bank_size, len(train))])
    queries = np.sort(rng.permutation(len(val))[: min(query_size, len(val))])
    return train.subset(bank), val.subset(queries)


def run_pretraining(
    data: DataConfig,
    cfg: PretrainConfig,
    manifest_ids: list[str] | None = None,
    stop_after_steps: int | None = None,
    on_knn: Callable[[int, float], None] | None = None,
) -> PretrainSummary:
    """Load the data, train (one writer per run directory), return the summary.

    ``on_knn(step, top1)`` is passed to ``pretrain`` (tuning reports it to its pruner).
    """
    from contextlib import nullcontext

    splits = load_data(data)
    train = apply_manifest(
        splits["train"], manifest_ids if cfg.train.use_curated_manifest else None
    )
    if is_main_process():
        warn_if_images_dwarf_the_crops(train, cfg)
    mean, std = channel_stats(train)
    bank, queries = knn_subsets(
        splits, cfg.train.knn_bank_size, cfg.train.knn_query_size, cfg.train.seed
    )
    lock = FolderLock(Path(cfg.train.run_dir), "pretrain") if is_main_process() else nullcontext()
    with lock:
        summary = pretrain(
            cfg, train, mean, std, bank, queries, stop_after_steps=stop_after_steps, on_knn=on_knn
        )
        summary = summary.model_copy(
            update={
                "n_train_images": len(train),
                "data": data.model_dump(mode="json"),
                "mlflow_run_id": tracking.active_run_id(),
            }
        )
        if is_main_process():  # the run directory is a teacher on its own (distillation): its
            # normalisation and MLflow run beside its weights, wherever the catalog keeps its copy
            atomic_write_json(
                Path(cfg.train.run_dir) / "pretrain_summary.json", summary.model_dump(mode="json")
            )
    return summary
