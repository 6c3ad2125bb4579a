"""The curation report: funnel, duplicate-component grids, cluster balance, JSON, MLflow.

Files under the report folder: funnel.png, duplicate_components.png, eval_duplicates.png,
cluster_balance.png (GX Data Docs are written by the validation step). The report itself is
returned (the Kedro catalog writes it as curation_report.json). Everything is logged to MLflow
when a run is active.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow.curation.config import CurationConfig
from dinoflow.curation.ingest import load_rgb
from dinoflow.data import Split

log = logging.getLogger(__name__)

FUNNEL_ORDER = [
    "unreadable",
    "too_large",
    "too_small",
    "extreme_aspect",
    "low_information",
    "exact_duplicate",
    "eval_duplicate",
    "eval_duplicate_component",
    "near_duplicate",
    "not_sampled",
]


def funnel(meta: pd.DataFrame) -> list[dict]:
    """Remaining train images after each reason, in pipeline order."""
    train = meta[meta["split"] == "train"]
    counts = train["reason"].value_counts()
    remaining = len(train)
    stages = [{"stage": "train pool", "removed": 0, "remaining": remaining}]
    for reason in FUNNEL_ORDER:
        removed = int(counts.get(reason, 0))
        remaining -= removed
        stages.append({"stage": reason, "removed": removed, "remaining": remaining})
    return stages


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_funnel(stages: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(stages) + 1))
    labels = [s["stage"] if not s["removed"] else f"{s['stage']} (-{s['removed']})" for s in stages]
    ax.barh(range(len(stages)), [s["remaining"] for s in stages], color="#4c72b0")
    for y, s in enumerate(stages):
        ax.text(s["remaining"], y, f" {s['remaining']}", va="center", fontsize=8)
    ax.set_yticks(range(len(stages)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("train images remaining")
    ax.set_title("curation funnel")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _groups(
    meta: pd.DataFrame, reasons: list[str], limit: int, per_group: int
) -> list[list[tuple[int, str]]]:
    """Rows of image grids: [(row, caption)], the kept (or matched eval) image first."""
    by_id = {i: k for k, i in enumerate(meta["item_id"].astype(str))}
    eval_by_id = {
        i: k
        for k, (i, s) in enumerate(zip(meta["item_id"].astype(str), meta["split"], strict=True))
        if s != "train"
    }
    dups = meta[meta["reason"].isin(reasons)]
    groups = []
    for head, part in dups.groupby("dup_of", sort=True):
        lookup = eval_by_id if "eval_duplicate" in reasons else by_id
        if head not in lookup:
            continue
        tag = "eval image" if "eval_duplicate" in reasons else "kept"
        cells = [(lookup[head], f"{tag}\n{head}")]
        cells += [
            (int(k), f"{r}\n{i}")
            for k, i, r in zip(part.index, part["item_id"], part["reason"], strict=True)
        ]
        groups.append(cells[:per_group])
        if len(groups) >= limit:
            break
    return groups


def plot_groups(
    groups: list[list[tuple[int, str]]],
    meta: pd.DataFrame,
    splits: dict[str, Split] | None,
    max_pixels: int,
    path: Path,
    title: str,
) -> None:
    plt = _plt()
    n_rows = max(len(groups), 1)
    n_cols = max((len(g) for g in groups), default=1)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.8 * n_cols, 1.9 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, group in enumerate(groups):
        for c, (row, caption) in enumerate(group):
            ax = axes[r, c]
            if splits is not None:
                split = splits[meta["split"].iat[row]]
                rgb = load_rgb(split, int(meta["index"].iat[row]), max_pixels)
                if rgb is not None:
                    ax.imshow(rgb)
            ax.set_title(caption[:60], fontsize=6, color="green" if c == 0 else "black")
    if not groups:
        axes[0, 0].text(0.5, 0.5, "none found", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_balance(balance: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    before = np.asarray(balance.get("sizes_before", []))
    after = np.asarray(balance.get("sizes_after", []))
    order = np.argsort(-before)
    x = np.arange(len(before))
    b, a = balance.get("before", {}), balance.get("after", {})
    ax.bar(
        x,
        before[order],
        color="#bbbbbb",
        label=(
            f"before: imbalance {b.get('imbalance_factor', 0):.2f}, H/lnK {b.get('normalized_entropy', 0):.3f}, "
            f"Gini {b.get('gini', 0):.3f}"
        ),
    )
    ax.bar(
        x,
        after[order],
        color="#4c72b0",
        alpha=0.8,
        label=(
            f"after: imbalance {a.get('imbalance_factor', 0):.2f}, H/lnK {a.get('normalized_entropy', 0):.3f}, "
            f"Gini {a.get('gini', 0):.3f}"
        ),
    )
    ax.set_yscale("log")
    ax.set_xlabel("top-level cluster (sorted by size before sampling)")
    ax.set_ylabel("images")
    ax.set_title("cluster sizes before / after balanced sampling")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        v = float(obj)
        return v if np.isfinite(v) else None
    return obj


def _counts(meta: pd.DataFrame, train: pd.DataFrame, quarantine: pd.DataFrame) -> dict:
    """Input, kept and removed images, per reason; files skipped; eval rows dropped."""
    return {
        "input": {s: int((meta["split"] == s).sum()) for s in ("train", "val", "test")},
        "kept": int((train["reason"] == "").sum()),
        "removed": int((train["reason"] != "").sum()),
        "per_reason": {r: int(v) for r, v in train["reason"].value_counts().items() if r},
        "skipped_files": {
            r: int(v)
            for r, v in quarantine[quarantine["split"] == ""]["reason"].value_counts().items()
        },
        "eval_rows_dropped": {
            r: int(v)
            for r, v in meta[meta["split"] != "train"]["reason"].value_counts().items()
            if r
        },
    }


def _eval_duplicates(meta: pd.DataFrame, train: pd.DataFrame) -> dict:
    """Pool images removed as duplicates of val/test: directly, by component, per eval split."""
    split_of_eval = dict(zip(meta["item_id"].astype(str), meta["split"], strict=True))
    split_of_eval = {k: v for k, v in split_of_eval.items() if v != "train"}
    contaminated = train[train["reason"].isin(["eval_duplicate", "eval_duplicate_component"])]
    by_split = contaminated["dup_of"].map(split_of_eval).value_counts()
    return {
        "removed_as_eval_duplicates": len(contaminated),
        "removed_as_eval_duplicates_direct": int(
            (contaminated["reason"] == "eval_duplicate").sum()
        ),
        "removed_as_eval_duplicates_component": int(
            (contaminated["reason"] == "eval_duplicate_component").sum()
        ),
        "removed_as_eval_duplicates_by_split": {k: int(v) for k, v in by_split.items()},
    }


def _plot_report(
    meta: pd.DataFrame,
    balance: dict,
    splits: dict[str, Split] | None,
    cfg: CurationConfig,
    stages: list[dict],
    out: Path,
) -> None:
    """funnel.png, duplicate_components.png, eval_duplicates.png, cluster_balance.png."""
    plot_funnel(stages, out / "funnel.png")
    max_px = min(cfg.ingest.max_pixels, cfg.quality.max_pixels)
    limit, per = cfg.report.max_components_shown, cfg.report.max_images_per_component
    plot_groups(
        _groups(meta, ["exact_duplicate", "near_duplicate"], limit, per),
        meta,
        splits,
        max_px,
        out / "duplicate_components.png",
        "duplicate components (first: kept)",
    )
    plot_groups(
        _groups(meta, ["eval_duplicate", "eval_duplicate_component"], limit, per),
        meta,
        splits,
        max_px,
        out / "eval_duplicates.png",
        "pool images removed as duplicates of val/test (first: the eval image)",
    )
    if not balance.get("skipped", True):
        plot_balance(balance, out / "cluster_balance.png")


def build_report(
    meta: pd.DataFrame,
    quarantine: pd.DataFrame,
    validation: dict,
    balance: dict,
    splits: dict[str, Split] | None,
    cfg: CurationConfig,
    timings: dict,
    report_dir: str | Path | None = None,
) -> dict:
    """Write the report files and return the JSON content (also logged to an active MLflow run).
    ``timings``: each stage's seconds and workers (``curate.outputs`` gathers them)."""
    out = Path(report_dir or cfg.report.dir)
    out.mkdir(parents=True, exist_ok=True)
    train = meta[meta["split"] == "train"]
    counts = _counts(meta, train, quarantine)
    eval_duplicates = _eval_duplicates(meta, train)
    stages = funnel(meta)
    report = {
        "counts": counts,
        **eval_duplicates,
        # the same pixels under two labels (kept once; which label is right is the user's call)
        "label_conflicts": [
            {"item_id": i, "duplicate_of": d, "detail": t}
            for i, d, t in zip(
                train["item_id"], train["dup_of"], train["detail"].astype(str), strict=True
            )
            if "under another label" in t
        ],
        "funnel": stages,
        "balance": balance,
        "validation": validation,
        "timings_s": timings,
        "config": cfg.model_dump(),
    }
    report = _json_safe(report)
    _plot_report(meta, balance, splits, cfg, stages, out)
    log_to_mlflow(report, out)
    return report


def log_to_mlflow(report: dict, out: Path) -> bool:
    """Log counts, balance, each stage's seconds and the report folder to the active MLflow
    run, if any."""
    mlflow = sys.modules.get("mlflow")  # no run can be active if mlflow was never imported
    if mlflow is None or not mlflow.active_run():
        return False
    metrics = {
        "curation_kept": report["counts"]["kept"],
        "curation_removed": report["counts"]["removed"],
        "curation_removed_as_eval_duplicates": report["removed_as_eval_duplicates"],
    }
    metrics.update({f"curation_removed_{k}": v for k, v in report["counts"]["per_reason"].items()})
    metrics.update(
        {
            f"curation_seconds_{stage}": t["seconds"]
            for stage, t in report.get("timings_s", {}).items()
            if isinstance(t, dict) and "seconds" in t
        }
    )
    for when in ("before", "after"):
        for key, value in (report["balance"].get(when) or {}).items():
            if value is not None:
                metrics[f"curation_balance_{when}_{key}"] = value
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_dict(report, "curation/curation_report.json")
    mlflow.log_artifacts(str(out), artifact_path="curation")
    return True
