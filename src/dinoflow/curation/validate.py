"""Great Expectations (1.x) suite on the ingested metadata, with Data Docs on disk.

Critical expectations stop the run (``CurationValidationError`` naming each): item ids unique and
present, labels in the known set (-1 = unlabelled), and at least ``min_readable_fraction`` of the
files readable. Warning expectations are logged and reported only: every file readable, minimum
side, aspect ratio, channel count (the quality filters then remove the offenders with a reason).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from dinoflow.curation.config import QualityConfig, ValidationConfig
from dinoflow.errors import DataError

log = logging.getLogger(__name__)


class CurationValidationError(DataError):
    """The ingested metadata breaks an expectation that must hold."""


def _table(meta: pd.DataFrame) -> pd.DataFrame:
    """The columns the suite looks at; unreadable rows carry -1 sizes."""
    short = meta[["width", "height"]].min(axis=1)
    long_ = meta[["width", "height"]].max(axis=1)
    return pd.DataFrame(
        {
            "split": meta["split"].astype(str),
            "item_id": meta["item_id"].astype(str),
            "label": meta["label"].astype(int),
            "readable": meta["readable"].astype(int),
            "min_side": short.where(meta["readable"], other=None).astype("float64"),
            "aspect": (long_ / short.clip(lower=1)).where(meta["readable"]).astype("float64"),
            "channels": meta["channels"].where(meta["readable"]).astype("float64"),
        }
    )


def validate_metadata(
    meta: pd.DataFrame,
    n_classes: int,
    cfg: ValidationConfig,
    quality: QualityConfig,
) -> dict:
    """Run the suite, write Data Docs under cfg.docs_dir, return a summary; raise on critical."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    docs_dir = Path(cfg.docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    ctx = _gx_context(docs_dir)
    batch = ctx.data_sources.add_pandas("curation").add_dataframe_asset("image_metadata")
    batch_def = batch.add_batch_definition_whole_dataframe("all_rows")
    suite = ctx.suites.add(gx.ExpectationSuite(name="curation_image_metadata"))
    for e in _expectations(n_classes, cfg, quality):
        suite.add_expectation(e)
    vdef = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="curation_metadata", data=batch_def, suite=suite)
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="curation",
            validation_definitions=[vdef],
            actions=[UpdateDataDocsAction(name="data_docs", site_names=["curation"])],
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": _table(meta)})
    checks, failures_critical = _checks(result)
    summary = {
        "success_critical": not failures_critical,
        "n_rows": len(meta),
        "checks": checks,
        "docs_index": str(docs_dir / "index.html"),
    }
    if failures_critical:
        raise CurationValidationError(
            "curation: the image metadata breaks expectations that must hold "
            f"(Data Docs: {docs_dir / 'index.html'}):\n  - " + "\n  - ".join(failures_critical)
        )
    return summary


def _gx_context(docs_dir: Path):
    """An ephemeral Great Expectations context whose Data Docs site is ``docs_dir``."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 - progress bars are cosmetic
        pass
    ctx.add_data_docs_site(
        site_name="curation",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return ctx


def _expectations(n_classes: int, cfg: ValidationConfig, quality: QualityConfig) -> list:
    """What the image metadata must satisfy (critical) or should (warnings)."""
    import great_expectations.expectations as gxe

    warn = "warning"
    known = [-1, *range(n_classes)]
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["split", "item_id"]),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=known),
        gxe.ExpectColumnMeanToBeBetween(column="readable", min_value=cfg.min_readable_fraction),
        gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[1], severity=warn),
        gxe.ExpectColumnValuesToBeBetween(
            column="min_side", min_value=quality.min_side, severity=warn
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="aspect", max_value=quality.max_aspect, severity=warn
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="channels", value_set=cfg.allowed_channels, severity=warn
        ),
    ]


def _checks(result) -> tuple[list[dict], list[str]]:
    """(every expectation's outcome, the critical failures as text); warnings are logged."""
    checks, failures_critical = [], []
    for run in result.run_results.values():
        for r in run.results:
            conf = r.expectation_config
            kwargs = {k: v for k, v in conf.kwargs.items() if k not in ("batch_id",)}
            severity = getattr(conf.severity, "value", str(conf.severity))
            item = {
                "expectation": conf.type,
                "kwargs": {
                    k: (v if len(str(v)) < 200 else str(v)[:200]) for k, v in kwargs.items()
                },
                "severity": severity,
                "success": bool(r.success),
                "unexpected_count": r.result.get("unexpected_count"),
                "examples": [str(v) for v in (r.result.get("partial_unexpected_list") or [])[:5]],
                "observed_value": str(r.result.get("observed_value", "")),
            }
            checks.append(item)
            if not r.success:
                where = kwargs.get("column") or kwargs.get("column_list")
                text = (
                    f"{conf.type} on {where}: {item['unexpected_count']} unexpected "
                    f"(e.g. {item['examples']}) observed {item['observed_value']}"
                )
                if severity == "critical":
                    failures_critical.append(text)
                else:
                    log.warning("curation validation (warning): %s", text)
    return checks, failures_critical
