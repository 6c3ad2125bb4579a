"""Quality filters on the ingested metadata, each with its own quarantine reason.

Order of precedence (the first that applies is the reason): unreadable, too_large (both set at
ingest), too_small, extreme_aspect, low_information. Each row's reason depends on that row alone,
so the table is filtered in blocks of ``ROWS_PER_BLOCK`` rows (a progress bar counts the images).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dinoflow.curation.config import QualityConfig

# Rows filtered at a time: the per-row detail texts of a block stay small, and the bar moves.
ROWS_PER_BLOCK = 65_536


def quality_reasons(
    meta: pd.DataFrame, cfg: QualityConfig, progress: bool = False
) -> tuple[pd.Series, pd.Series]:
    """(reason, detail) per row; reason "" keeps the row. Ingest reasons are kept as they are."""
    from tqdm.auto import tqdm

    reasons, details = [], []
    with tqdm(total=len(meta), desc="quality filters", unit="img", disable=not progress) as bar:
        for start in range(0, max(len(meta), 1), ROWS_PER_BLOCK):
            block = meta.iloc[start : start + ROWS_PER_BLOCK]
            reason, detail = _block_reasons(block, cfg)
            reasons.append(reason)
            details.append(detail)
            bar.update(len(block))
    return pd.concat(reasons), pd.concat(details)


def _block_reasons(meta: pd.DataFrame, cfg: QualityConfig) -> tuple[pd.Series, pd.Series]:
    """``quality_reasons`` on a block of rows, vectorised."""
    reason = meta["reason"].fillna("").astype(str).copy()
    detail = meta["detail"].fillna("").astype(str).copy()
    w = meta["width"].to_numpy(dtype=np.float64)
    h = meta["height"].to_numpy(dtype=np.float64)
    open_ = (reason == "").to_numpy() & meta["readable"].to_numpy(dtype=bool)
    # A row with no reason that could not be read (should not happen) is unreadable all the same.
    lost = (reason == "").to_numpy() & ~meta["readable"].to_numpy(dtype=bool)
    reason[lost], detail[lost] = "unreadable", "no pixels decoded"

    def mark(mask: np.ndarray, name: str, texts: list[str]) -> None:
        nonlocal open_
        hit = open_ & mask
        reason[hit] = name
        detail[hit] = np.asarray(texts, dtype=object)[hit]
        open_ = open_ & ~hit

    sizes = [f"{int(a)}x{int(b)}" for a, b in zip(w, h, strict=True)]
    mark(w * h > cfg.max_pixels, "too_large", [f"{s} > {cfg.max_pixels} pixels" for s in sizes])
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    mark(short < cfg.min_side, "too_small", [f"{s}: side < {cfg.min_side}" for s in sizes])
    aspect = long_ / np.maximum(short, 1)
    mark(
        aspect > cfg.max_aspect,
        "extreme_aspect",
        [f"{s}: aspect {a:.2f} > {cfg.max_aspect}" for s, a in zip(sizes, aspect, strict=True)],
    )
    std = meta["std"].to_numpy(dtype=np.float64)
    ent = meta["entropy"].to_numpy(dtype=np.float64)
    low = (std < cfg.min_std) | (ent < cfg.min_entropy_bits)
    mark(
        low,
        "low_information",
        [
            f"grey std {s:.2f} (min {cfg.min_std}), entropy {e:.2f} bits (min {cfg.min_entropy_bits})"
            for s, e in zip(std, ent, strict=True)
        ],
    )
    return reason, detail


def apply_quality(meta: pd.DataFrame, cfg: QualityConfig, progress: bool = False) -> pd.DataFrame:
    """A copy of the table with reason/detail filled by the quality filters."""
    out = meta.copy()
    out["reason"], out["detail"] = quality_reasons(meta, cfg, progress)
    return out
