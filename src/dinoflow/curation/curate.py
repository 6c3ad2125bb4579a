"""The curation steps on one metadata table (a row per item of train/val/test), in order.

ingest -> validate -> quality -> embed -> deduplicate (exact, eval decontamination, near)
-> balanced sampling -> outputs. Each step returns a new table; a row leaves the curated set by
getting a ``reason`` (and a ``detail``), never by being deleted, so the quarantine lists every
dropped file. Only train rows form the pretraining pool; val/test rows are the references for
decontamination. The Kedro nodes (``dinoflow.pipelines.curation``) call these one by one;
the Kedro pipeline ``curation`` runs them in this order, one node each.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow import distributed
from dinoflow.config import DataConfig
from dinoflow.curation import dedup as dd
from dinoflow.curation import ranks
from dinoflow.curation.config import CurationConfig
from dinoflow.curation.decontam import eval_matches, expand_to_components
from dinoflow.curation.embed import pixel_embeddings, thumbnail_mean_std
from dinoflow.curation.embed_run import embed_chunks
from dinoflow.curation.ingest import list_skipped_files, load_rgb
from dinoflow.curation.ingest_run import IngestSettings, ingest_splits
from dinoflow.curation.quality import apply_quality
from dinoflow.curation.rows import Rows
from dinoflow.curation.sampling import (
    balance_stats,
    hierarchical_kmeans,
    hierarchical_sample,
    top_level_labels,
)
from dinoflow.curation.validate import validate_metadata
from dinoflow.data import Split, load_data
from dinoflow.data.sources import get_source

log = logging.getLogger(__name__)

QUALITY_REASONS = ["unreadable", "too_large", "too_small", "extreme_aspect", "low_information"]
DEDUP_REASONS = ["exact_duplicate", "eval_duplicate", "eval_duplicate_component", "near_duplicate"]
ALL_REASONS = [*QUALITY_REASONS, *DEDUP_REASONS, "not_sampled"]


TIMINGS = "timings_s"  # meta.attrs[TIMINGS]: {stage: {"seconds", "workers", ...}}


def _timed(meta: pd.DataFrame, stage: str, t0: float, workers: int = 1, **extra) -> pd.DataFrame:
    """Record a stage's seconds (since ``t0``) and worker count in the table's attrs, which
    travel with it (copies included) to the report."""
    timings = dict(meta.attrs.get(TIMINGS, {}))
    timings[stage] = {"seconds": round(time.perf_counter() - t0, 3), "workers": workers, **extra}
    meta.attrs[TIMINGS] = timings
    return meta


def ingest(splits: dict[str, Split], cfg: CurationConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata table and (N, s, s, 3) thumbnails of all splits (train rows first), by
    ``curation.workers`` processes in chunks kept in ``curation.work_dir`` (a re-run re-uses
    them); the thumbnails memory-mapped from ``<work_dir>/thumbnails.npy``."""
    t0 = time.perf_counter()
    settings = IngestSettings(
        cfg.embedding.pixel_size,
        min(cfg.ingest.max_pixels, cfg.quality.max_pixels),
        cfg.ingest.compute_phash and cfg.dedup.phash,
        cfg.dedup.phash_min_side,
        cfg.ingest.decode_min_side,
    )
    meta, thumbs, stats = ingest_splits(
        splits,
        settings,
        cfg.work_dir,
        cfg.workers,
        cfg.ingest.files_per_chunk,
        cfg.ingest.arrays_per_chunk,
        cfg.show_progress,
    )
    for col, default in (("component", -1), ("dup_of", ""), ("cluster", -1)):
        meta[col] = default
    extra = {k: v for k, v in stats.as_dict().items() if k not in ("seconds", "workers")}
    return _timed(meta, "ingest", t0, stats.workers, **extra), thumbs


def validate(meta: pd.DataFrame, n_classes: int, cfg: CurationConfig) -> dict:
    """The GX suite (``validate_metadata``); {"skipped": True} when disabled. ``timing``: the
    stage's seconds and workers, for the report."""
    if not cfg.validation.enabled:
        return {"skipped": True}
    t0 = time.perf_counter()
    result = validate_metadata(meta, n_classes, cfg.validation, cfg.quality, cfg.show_progress)
    return {**result, "timing": {"seconds": round(time.perf_counter() - t0, 3), "workers": 1}}


def quality(meta: pd.DataFrame, cfg: CurationConfig) -> pd.DataFrame:
    """Reasons unreadable / too_large / too_small / extreme_aspect / low_information."""
    t0 = time.perf_counter()
    return _timed(apply_quality(meta, cfg.quality, cfg.show_progress), "quality", t0)


def _pool(meta: pd.DataFrame) -> np.ndarray:
    return ((meta["split"] == "train") & (meta["reason"] == "")).to_numpy()


def _eval_rows(meta: pd.DataFrame) -> np.ndarray:
    """Readable val/test rows: every evaluation image counts, whatever its quality."""
    return ((meta["split"] != "train") & meta["readable"].astype(bool)).to_numpy()


def embed(
    meta: pd.DataFrame, thumbs: np.ndarray, splits: dict[str, Split] | None, cfg: CurationConfig
) -> tuple[np.ndarray, dict]:
    """(N, D) float32 L2-normalised embeddings of pool and eval rows (other rows zero), and the
    stage's timing for the report; model embedders chunk by chunk in ``curation.work_dir``
    (resumable, shared by a job's ranks)."""
    t0 = time.perf_counter()
    emb = _embeddings(meta, thumbs, splits, cfg)
    seconds = round(time.perf_counter() - t0, 3)
    return emb, {"seconds": seconds, "workers": 1, "embedder": cfg.embedding.kind}


def _embeddings(
    meta: pd.DataFrame, thumbs: np.ndarray, splits: dict[str, Split] | None, cfg: CurationConfig
) -> np.ndarray:
    e = cfg.embedding
    pool, evals = _pool(meta), _eval_rows(meta)
    use = pool | evals
    if e.kind == "pixels":
        return pixel_embeddings(
            thumbs, pool, use, e.pca_dim, e.pca_max_fit, cfg.sampling.seed, cfg.show_progress
        )
    if splits is None:
        raise ValueError(f"curation.embedding.kind={e.kind} needs the image splits to re-decode")
    max_px = min(cfg.ingest.max_pixels, cfg.quality.max_pixels)
    split_col, index_col = meta["split"].to_numpy(), meta["index"].to_numpy()

    def load(row: int) -> np.ndarray:
        rgb = load_rgb(splits[split_col[row]], int(index_col[row]), max_px)
        if rgb is None:  # decoded at ingest, so this file changed since
            raise ValueError(f"curation: {meta['item_id'].iat[row]} can no longer be decoded")
        return rgb

    def dataset_stats() -> tuple[list[float], list[float]]:  # rank 0 reads the thumbnails
        return ranks.from_main(lambda: thumbnail_mean_std(thumbs, pool))

    rows = np.flatnonzero(use)
    return embed_chunks(e, load, meta, rows, dataset_stats, cfg.work_dir, cfg.show_progress)


def _phash_ok(meta: pd.DataFrame, cfg: CurationConfig) -> list[str]:
    """pHash where meaningful (both sides >= phash_min_side), "" elsewhere."""
    small = meta[["width", "height"]].min(axis=1) < cfg.dedup.phash_min_side
    return meta["phash"].where(~small, "").fillna("").astype(str).tolist()


LABEL_CONFLICT = "under another label"


def _report_label_conflicts(
    meta: pd.DataFrame, gone: np.ndarray, twins: np.ndarray, detail: np.ndarray
) -> None:
    """The same pixels filed under two labels: said in the quarantine detail and warned."""
    labels, names = meta["label"].to_numpy(), meta["item_id"].to_numpy(dtype=object)
    clash = [
        (g, t)
        for g, t in zip(gone, twins, strict=True)
        if labels[g] >= 0 and labels[t] >= 0 and labels[g] != labels[t]
    ]
    for g, t in clash:
        detail[g] = (
            f"same pixels as {names[t]}, {LABEL_CONFLICT} (label {labels[g]} vs {labels[t]})"
        )
    if clash:
        log.warning(
            "curation: %d image(s) appear under two labels, e.g. %s and %s",
            len(clash),
            names[clash[0][0]],
            names[clash[0][1]],
        )


def deduplicate(meta: pd.DataFrame, emb: np.ndarray, cfg: CurationConfig) -> pd.DataFrame:
    """Exact duplicates, eval decontamination (with whole components), then near duplicates."""
    t0, meta = time.perf_counter(), meta.copy()
    reason = meta["reason"].to_numpy(dtype=object, copy=True)
    detail = meta["detail"].to_numpy(dtype=object, copy=True)
    ids = meta["item_id"].to_numpy(dtype=object)
    dup_of = meta["dup_of"].to_numpy(dtype=object, copy=True)
    component = meta["component"].to_numpy(dtype=np.int64, copy=True)
    priority = -(meta["width"].to_numpy(np.int64) * meta["height"].to_numpy(np.int64))
    d = cfg.dedup

    # 1. exact duplicates in the pool (identical decoded pixels): keep the first, largest.
    pool_idx = np.flatnonzero(_pool(meta))
    if d.exact and len(pool_idx):
        keep, twin = dd.exact_duplicates(meta["sha256"].iloc[pool_idx], priority[pool_idx])
        gone = pool_idx[~keep]
        twins = pool_idx[twin[~keep]]
        reason[gone], dup_of[gone] = "exact_duplicate", ids[twins]
        detail[gone] = [f"same pixels as {t}" for t in dup_of[gone]]
        _report_label_conflicts(meta, gone, twins, detail)

    # 2. near-duplicate graph over the remaining pool.
    pool_idx = np.flatnonzero((meta["split"] == "train").to_numpy() & (reason == ""))
    ph = _phash_ok(meta, cfg)
    comp = _near_duplicate_components(emb, pool_idx, ph, cfg)
    sizes = np.bincount(comp) if len(comp) else np.zeros(0, np.int64)
    component[pool_idx] = np.where(sizes[comp] > 1, comp, -1) if len(comp) else -1

    # 3. eval decontamination: direct hits, then their whole component.
    _decontaminate(meta, emb, pool_idx, ph, comp, (reason, detail, dup_of), cfg)

    # 4. near duplicates: one image kept per remaining component.
    alive = reason[pool_idx] == ""
    if alive.any():
        sub = pool_idx[alive]
        keep = dd.representatives(comp[alive], priority[sub])
        kept_of = {c: r for c, r in zip(comp[alive][keep], sub[keep], strict=True)}
        gone = sub[~keep]
        reason[gone] = "near_duplicate"
        dup_of[gone] = [ids[kept_of[c]] for c in comp[alive][~keep]]
        detail[gone] = [
            f"near duplicate of {ids[kept_of[c]]} (component of {sizes[c]})"
            for c in comp[alive][~keep]
        ]
    meta["reason"], meta["detail"], meta["dup_of"], meta["component"] = (
        reason,
        detail,
        dup_of,
        component,
    )
    return _timed(meta, "deduplicate", t0, distributed.world()[1])


def _index_folder(cfg: CurationConfig, name: str) -> Path | None:
    """Where an IVF index over many vectors is built on disk (``dedup.build_index``)."""
    return None if cfg.work_dir is None else Path(cfg.work_dir) / "index" / name


def _near_duplicate_components(
    emb: np.ndarray, pool_idx: np.ndarray, ph: list, cfg: CurationConfig
) -> np.ndarray:
    """The connected component of each pool row in the graph of embedding-similar and
    pHash-close pairs (a row alone is its own component)."""
    d = cfg.dedup
    src, dst = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if d.embedding and len(pool_idx) > 1:
        s, t, _ = dd.similarity_edges(
            Rows(emb, pool_idx),
            d.cosine_threshold,
            d.k_neighbors,
            d,
            progress=cfg.show_progress,
            folder=_index_folder(cfg, "near_duplicates"),
        )
        src.append(s)
        dst.append(t)
    if d.phash:
        local = np.array([k for k, r in enumerate(pool_idx) if ph[r]], dtype=np.int64)
        if len(local) > 1:
            s, t, _ = dd.hamming_edges(
                dd.phash_bytes([ph[pool_idx[k]] for k in local]),
                d.phash_max_distance,
                d.k_neighbors,
            )
            src.append(local[s])
            dst.append(local[t])
    return dd.connected_components(len(pool_idx), np.concatenate(src), np.concatenate(dst))


def _decontaminate(
    meta: pd.DataFrame,
    emb: np.ndarray,
    pool_idx: np.ndarray,
    ph: list,
    comp: np.ndarray,
    columns: tuple[np.ndarray, np.ndarray, np.ndarray],
    cfg: CurationConfig,
) -> None:
    """Pool rows matching an evaluation image (and, with ``remove_component``, the rest of their
    near-duplicate component) marked in ``columns`` = (reason, detail, dup_of), in place."""
    reason, detail, dup_of = columns
    d, dc = cfg.dedup, cfg.decontam
    ids = meta["item_id"].to_numpy(dtype=object)
    eval_idx = np.flatnonzero(_eval_rows(meta))
    if not (dc.enabled and len(pool_idx) and len(eval_idx)):
        return
    sha = meta["sha256"].astype(str).to_numpy()
    use_emb = d.embedding or cfg.embedding.kind != "pixels"
    match, how = eval_matches(
        sha[pool_idx].tolist(),
        sha[eval_idx].tolist(),
        Rows(emb, pool_idx) if use_emb else None,
        Rows(emb, eval_idx) if use_emb else None,
        [ph[r] for r in pool_idx] if d.phash else None,
        [ph[r] for r in eval_idx] if d.phash else None,
        dc,
        d,
        _index_folder(cfg, "evaluation"),
    )
    hit = match >= 0
    rows = pool_idx[hit]
    reason[rows] = "eval_duplicate"
    dup_of[rows] = ids[eval_idx[match[hit]]]
    detail[rows] = [
        f"{h} with {e}" for h, e in zip(np.asarray(how, object)[hit], dup_of[rows], strict=True)
    ]
    if dc.remove_component:
        spread = expand_to_components(hit, comp) & ~hit
        first_hit = {}
        for k in np.flatnonzero(hit):
            first_hit.setdefault(comp[k], pool_idx[k])
        rows = pool_idx[spread]
        reason[rows] = "eval_duplicate_component"
        dup_of[rows] = [dup_of[first_hit[c]] for c in comp[spread]]
        detail[rows] = [
            f"near duplicate of {ids[first_hit[c]]}, which matches {dup_of[first_hit[c]]}"
            for c in comp[spread]
        ]


def balanced_sampling(
    meta: pd.DataFrame, emb: np.ndarray, cfg: CurationConfig
) -> tuple[pd.DataFrame, dict]:
    """Cluster the remaining pool, sample it to target_size; returns (table, balance report)."""
    s = cfg.sampling
    meta = meta.copy()
    pool_idx = np.flatnonzero(_pool(meta))
    if not s.enabled or len(pool_idx) < 2:
        return meta, {"skipped": True, "n_pool": len(pool_idx)}
    x = Rows(emb, pool_idx)
    n_clusters, n = [], len(x)
    for k in s.n_clusters:  # small pools (smoke runs, tests): no more clusters than points
        n = min(k, n)
        n_clusters.append(n)
    t0 = time.perf_counter()
    levels = hierarchical_kmeans(
        x,
        n_clusters,
        s.resampling_steps,
        s.resample_sizes,
        s.kmeans_iters,
        s.seed,
        s.kmeans_init,
        s.max_points_per_centroid,
        cfg.show_progress,
    )
    top = top_level_labels(levels)
    chosen = hierarchical_sample(levels, s.target_size, s.strategy, s.seed)
    k_top = len(levels[-1].centroids)
    before = np.bincount(top, minlength=k_top)
    after = np.bincount(top[chosen], minlength=k_top)
    cluster = meta["cluster"].to_numpy(np.int64, copy=True)
    cluster[pool_idx] = top
    meta["cluster"] = cluster
    dropped = np.setdiff1d(np.arange(len(pool_idx)), chosen)
    rows = pool_idx[dropped]
    meta.loc[rows, "reason"] = "not_sampled"
    meta.loc[rows, "detail"] = [
        f"cluster {c}: {after[c]} of {before[c]} kept (target {s.target_size})"
        for c in top[dropped]
    ]
    report = {
        "skipped": False,
        "n_pool": len(pool_idx),
        "n_selected": len(chosen),
        "target_size": s.target_size,
        "n_clusters_per_level": [len(lvl.centroids) for lvl in levels],
        "sizes_before": before.tolist(),
        "sizes_after": after.tolist(),
        "before": balance_stats(before),
        "after": balance_stats(after),
        "finest_before": balance_stats(np.bincount(levels[0].assignment)),
        "finest_after": balance_stats(
            np.bincount(levels[0].assignment[chosen], minlength=len(levels[0].centroids))
        ),
        "seconds": time.perf_counter() - t0,
    }
    return _timed(meta, "sampling", t0, distributed.world()[1]), report


def load_splits(data: DataConfig) -> dict[str, Split]:
    """The train/val/test splits, each carrying the folder (``root``) whose files the source
    skipped, for the quarantine list; None for a source that reads no files."""
    splits = load_data(data)
    root = data.path if get_source(data.source).reads_files else None
    for split in splits.values():
        split.extra.update(root=root, follow_out_of_root=data.follow_symlinks_out_of_root)
    return splits


def outputs(
    meta: pd.DataFrame,
    validation: dict,
    balance: dict,
    splits: dict[str, Split],
    embed_timing: dict,
    cfg: CurationConfig,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(curated manifest, quarantine list, report): the report's pictures drawn and, with an
    active MLflow run, logged; ``timings_s`` holds every stage, validation and embedding too."""
    from dinoflow.curation.report import build_report

    stages = {"validate": validation.get("timing"), "embed": embed_timing}
    timings = {**meta.attrs.get(TIMINGS, {}), **{k: v for k, v in stages.items() if v}}
    train = splits["train"]
    quarantine = quarantine_of(
        meta, train.extra.get("root"), train.extra.get("follow_out_of_root", False)
    )
    report = build_report(meta, quarantine, validation, balance, splits, cfg, timings)
    return manifest_of(meta), quarantine, report


def manifest_of(meta: pd.DataFrame) -> pd.DataFrame:
    """The curated set: item_id, label, cluster of the train rows without a reason."""
    kept = meta[(meta["split"] == "train") & (meta["reason"] == "")]
    return (
        kept[["item_id", "label", "cluster"]]
        .reset_index(drop=True)
        .astype({"item_id": str, "label": int, "cluster": int})
    )


def quarantine_of(
    meta: pd.DataFrame, root: str | Path | None = None, follow_out_of_root: bool = False
) -> pd.DataFrame:
    """Every dropped item: item_id, path, split, reason, detail, duplicate_of (+ skipped files)."""
    bad = meta[meta["reason"] != ""]
    q = pd.DataFrame(
        {
            "item_id": bad["item_id"].astype(str),
            "path": bad["path"].astype(str),
            "split": bad["split"].astype(str),
            "reason": bad["reason"].astype(str),
            "detail": bad["detail"].astype(str),
            "duplicate_of": bad["dup_of"].astype(str),
        }
    )
    if root is not None:
        skipped = list_skipped_files(root, follow_out_of_root)
        if skipped:
            root_p = Path(root)
            extra = pd.DataFrame(
                {
                    "item_id": [Path(p).relative_to(root_p).as_posix() for p, _, _ in skipped],
                    "path": [p for p, _, _ in skipped],
                    "split": "",
                    "reason": [r for _, r, _ in skipped],
                    "detail": [t for _, _, t in skipped],
                    "duplicate_of": "",
                }
            )
            q = pd.concat([q, extra], ignore_index=True)
    return q.reset_index(drop=True)
