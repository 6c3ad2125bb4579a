"""Great Expectations (1.x) suite on the ingested metadata, with Data Docs on disk.

Critical expectations stop the run (``CurationValidationError`` naming each): item ids unique and
present, labels in the known set (-1 = unlabelled), and at least ``min_readable_fraction`` of the
files readable. Warning expectations are logged and reported only: every file readable, minimum
side, aspect ratio, channel count (the quality filters then remove the offenders with a reason).

The expectations that judge the whole table (ids unique: a duplicate may straddle two blocks;
the readable mean: a block's is not the table's; any but a per-row verdict) run first, once.
Those that judge each row alone then run block by block (``rows_per_batch`` rows; the progress
bar counts the images), their per-block outcomes adding up to the table's. The summary
and Data Docs are those of a single run on the whole table.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dinoflow.curation.config import QualityConfig, ValidationConfig
from dinoflow.errors import DataError

log = logging.getLogger(__name__)

# GX's SUMMARY format, its partial lists (first unexpected values in row order) made explicit so
# that the per-block lists merge into the table's.
PARTIAL_UNEXPECTED = 20
_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED}


class CurationValidationError(DataError):
    """The ingested metadata breaks an expectation that must hold."""


def _table(meta: pd.DataFrame) -> pd.DataFrame:
    """The columns the suite looks at; unreadable rows carry no sizes."""
    short = meta[["width", "height"]].min(axis=1)
    long_ = meta[["width", "height"]].max(axis=1)
    return pd.DataFrame(
        {
            "split": meta["split"].astype(str),
            "item_id": meta["item_id"].astype(str),
            "readable": meta["readable"].astype(int),
            "label": meta["label"].astype(int),
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
    progress: bool = False,
) -> dict:
    """Run the suite, write Data Docs under cfg.docs_dir, return a summary; raise on critical."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from tqdm.auto import tqdm

    docs_dir = Path(cfg.docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    ctx = _gx_context(docs_dir)
    expectations = _expectations(n_classes, cfg, quality)
    rows_def, table_def = _validation_definitions(ctx, expectations)
    run_id = gx.RunIdentifier(run_name="curation", run_time=datetime.datetime.now(datetime.UTC))
    with tqdm(
        total=len(meta), desc="validate (Great Expectations)", unit="img", disable=not progress
    ) as bar:
        bar.set_postfix_str("whole-table checks")
        table = _table(meta)  # built once; the blocks are slices of it
        table_result = table_def.run(
            batch_parameters={"dataframe": table},
            result_format=_RESULT_FORMAT,
            run_id=run_id,
        )
        bar.set_postfix_str("", refresh=False)
        bar.reset()  # the rate and ETA are those of the blocks, all that is left
        rows_result, n_blocks = _validate_rows_in_blocks(
            rows_def, table, cfg.rows_per_batch, run_id, bar
        )
    _write_data_docs(ctx, [rows_result, table_result], run_id)

    order = {e.id: i for i, e in enumerate(expectations)}
    results = sorted(
        [*rows_result.results, *table_result.results],
        key=lambda r: order[r.expectation_config.id],
    )
    checks, failures_critical = _checks(results)
    summary = {
        "success_critical": not failures_critical,
        "n_rows": len(meta),
        "n_blocks": n_blocks,
        "checks": checks,
        "docs_index": str(docs_dir / "index.html"),
    }
    if failures_critical:
        raise CurationValidationError(
            "curation: the image metadata breaks expectations that must hold "
            f"(Data Docs: {docs_dir / 'index.html'}):\n  - " + "\n  - ".join(failures_critical)
        )
    return summary


def _validation_definitions(ctx, expectations: list) -> tuple:
    """(row-wise, table-wide) validation definitions, each with its suite, on one dataframe
    asset whose batch is the dataframe passed at run time."""
    import great_expectations as gx

    batch_def = (
        ctx.data_sources.add_pandas("curation")
        .add_dataframe_asset("image_metadata")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    definitions = []
    for name, whole_table in (("rows", False), ("table", True)):
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"curation_image_metadata_{name}"))
        for e in expectations:
            if _judges_whole_table(e) != whole_table:
                continue
            if not whole_table and getattr(e, "mostly", 1) != 1:
                raise ValueError(f"{e.expectation_type}: mostly would not add up over blocks")
            suite.add_expectation(e)
        definitions.append(
            ctx.validation_definitions.add(
                gx.ValidationDefinition(
                    name=f"curation_metadata_{name}", data=batch_def, suite=suite
                )
            )
        )
    return tuple(definitions)


def _validate_rows_in_blocks(rows_def, table: pd.DataFrame, step: int, run_id, bar) -> tuple:
    """(the row-wise suite's result on the whole table, number of blocks): one GX run per block
    of ``step`` rows (its result replacing the previous block's in the store), ``bar`` counting
    the images, and the per-block outcomes added up."""
    tallies: dict[str, _RowTally] = {}
    result, n_blocks = None, 0
    for start in range(0, max(len(table), 1), step):
        block = table.iloc[start : start + step]
        result = rows_def.run(
            batch_parameters={"dataframe": block},
            result_format=_RESULT_FORMAT,
            run_id=run_id,
        )
        for r in result.results:
            tallies.setdefault(r.expectation_config.id, _RowTally()).add(r)
        bar.update(len(block))
        n_blocks += 1
    _settle(result, tallies)
    return result, n_blocks


def _write_data_docs(ctx, results: list, run_id) -> None:
    """Store the suites' results of this run (the row-wise one added up over the blocks) and
    render their pages and the index of the Data Docs site."""
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    keys: list = []
    for result in results:
        suite_key = ExpectationSuiteIdentifier(name=result.suite_name)
        result_key = ValidationResultIdentifier(
            expectation_suite_identifier=suite_key, run_id=run_id, batch_identifier=result.batch_id
        )
        ctx.validation_results_store.set(result_key, result)
        keys += [result_key, suite_key]
    ctx.build_data_docs(site_names=["curation"], resource_identifiers=keys)


@dataclass
class _RowTally:
    """One row-wise expectation's SUMMARY result gathered block by block. None of the suite's
    expectations sets ``mostly``, so one holds on the table iff it holds on every block; the
    counts add up, and the partial lists are the first unexpected values in row order."""

    success: bool = True
    element_count: int = 0
    unexpected_count: int = 0
    missing_count: int | None = None
    partial_values: list = field(default_factory=list)
    partial_index: list = field(default_factory=list)
    failed_to_run: Any = None  # the first block's result whose expectation raised

    def add(self, r) -> None:
        """Count one block's result for this expectation."""
        if "unexpected_count" not in r.result:
            if self.failed_to_run is None:
                self.failed_to_run = r
            return
        self.success = self.success and bool(r.success)
        self.element_count += r.result["element_count"]
        self.unexpected_count += r.result["unexpected_count"]
        if "missing_count" in r.result:
            self.missing_count = (self.missing_count or 0) + r.result["missing_count"]
        room = PARTIAL_UNEXPECTED - len(self.partial_values)
        self.partial_values += list(r.result.get("partial_unexpected_list", []))[:room]
        room = PARTIAL_UNEXPECTED - len(self.partial_index)
        self.partial_index += list(r.result.get("partial_unexpected_index_list", []))[:room]

    def result(self) -> dict:
        """The result dict GX gives for this expectation on the whole table (its formulas)."""
        total, bad, missing = self.element_count, self.unexpected_count, self.missing_count
        pct_total = pct_nonmissing = pct_missing = None
        if total > 0:
            pct_total = bad / total * 100
            if missing is None:
                pct_nonmissing = pct_total
            else:
                pct_missing = missing / total * 100
                pct_nonmissing = bad / (total - missing) * 100 if total > missing else None
        out: dict[str, Any] = {
            "element_count": total,
            "unexpected_count": bad,
            "unexpected_percent": pct_nonmissing,
            "partial_unexpected_list": self.partial_values,
        }
        if missing is not None:
            out |= {
                "missing_count": missing,
                "missing_percent": pct_missing,
                "unexpected_percent_total": pct_total,
                "unexpected_percent_nonmissing": pct_nonmissing,
            }
        try:
            most = Counter(self.partial_values).most_common(PARTIAL_UNEXPECTED)
            counts = sorted(most, key=lambda x: (-x[1], x[0]))
            out["partial_unexpected_counts"] = [{"value": v, "count": c} for v, c in counts]
        except TypeError:  # unorderable values: GX leaves the counts out too
            pass
        out["partial_unexpected_index_list"] = self.partial_index
        return out


def _settle(suite_result, tallies: dict[str, _RowTally]) -> None:
    """Turn the last block's suite result into the whole table's (results and statistics; the
    block's data fingerprint dropped, as it names that block only)."""
    suite_result.meta.get("batch_markers", {}).pop("pandas_data_fingerprint", None)
    for i, r in enumerate(suite_result.results):
        tally = tallies[r.expectation_config.id]
        if tally.failed_to_run is not None:
            suite_result.results[i] = tally.failed_to_run
        else:
            r.success, r.result = tally.success, tally.result()
    n_ok = sum(bool(r.success) for r in suite_result.results)
    n_all = len(suite_result.results)
    suite_result.success = n_ok == n_all
    suite_result.statistics = {
        "evaluated_expectations": n_all,
        "successful_expectations": n_ok,
        "unsuccessful_expectations": n_all - n_ok,
        "success_percent": n_ok / n_all * 100 if n_all else None,
    }


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


def _judges_whole_table(expectation) -> bool:
    """Whether the expectation's outcome depends on rows together. Only a column-map
    expectation (a verdict per row) that is not about uniqueness adds up over blocks; anything
    else (aggregates, uniqueness, multi-column) runs once on the whole table."""
    from great_expectations.expectations.expectation import ColumnMapExpectation

    row_by_row = isinstance(expectation, ColumnMapExpectation)
    return not row_by_row or "unique" in type(expectation).__name__.lower()


def _checks(results: list) -> tuple[list[dict], list[str]]:
    """(every expectation's outcome, the critical failures as text); warnings are logged."""
    checks, failures_critical = [], []
    for r in results:
        conf = r.expectation_config
        kwargs = {k: v for k, v in conf.kwargs.items() if k not in ("batch_id",)}
        severity = getattr(conf.severity, "value", str(conf.severity))
        item = {
            "expectation": conf.type,
            "kwargs": {k: (v if len(str(v)) < 200 else str(v)[:200]) for k, v in kwargs.items()},
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
