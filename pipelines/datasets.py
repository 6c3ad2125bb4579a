"""Catalog datasets for dinoflow's own artefacts.

- ``ResultDataset``: a typed job result (``dinoflow.results``: PretrainSummary, EvaluationReport,
  RegistrationDecision) as JSON, written atomically; ``optional: true`` loads None when absent
  (e.g. evaluation of a model given by parameter, without a pretrain run).
- ``AtomicJSONDataset``: a plain JSON dict written atomically.
- ``ReportSetDataset``: an evaluation's metrics, report and folder of pictures and details
  (``ReportSet``), replaced as one set: a reader, or a run killed mid-save, sees the old set or
  the new one, never a mix.
- ``OptionalCSVDataset``: a CSV that loads as None when absent (pretrain without curation).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro_datasets.pandas import CSVDataset

from dinoflow.files import atomic_write_json, recover_swaps, staging_folder, swap_in
from dinoflow.results import EvaluationReport


class OptionalCSVDataset(CSVDataset):
    """A CSV that loads as None when the file is absent (e.g. pretrain run without curation)."""

    def load(self) -> Any:
        return super().load() if self._exists() else None

    def md5(self) -> str:
        """The md5 DVC records for the file (its content hash), or "absent"."""
        path = Path(self._filepath)
        if not path.is_file():
            return "absent"
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


class AtomicJSONDataset(AbstractDataset):
    """A JSON dict, written to a temp file and renamed: a reader sees the old file or the new."""

    def __init__(self, filepath: str, optional: bool = False, metadata: dict | None = None):
        self._path, self._optional, self.metadata = Path(filepath), optional, metadata

    def load(self) -> Any:
        if self._optional and not self._path.is_file():
            return None
        return json.loads(self._path.read_text())

    def save(self, data: Any) -> None:
        atomic_write_json(self._path, data)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "optional": self._optional}


class ResultDataset(AtomicJSONDataset):
    """A ``dinoflow.results`` model as JSON (``model``: its dotted class path)."""

    def __init__(self, filepath: str, model: str, optional: bool = False,
                 metadata: dict | None = None):
        super().__init__(filepath, optional, metadata)
        module, _, name = model.rpartition(".")
        self._model = getattr(importlib.import_module(module), name)

    def load(self) -> Any:
        raw = super().load()
        return None if raw is None else self._model.model_validate(raw)

    def save(self, data: Any) -> None:
        value = data if isinstance(data, self._model) else self._model.model_validate(data)
        super().save(value.model_dump(mode="json"))

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "model": self._model.__name__}


@dataclass
class ReportSet:
    """One evaluation's output: its metrics, its report and the folder of the files the report
    names (pictures, details). A node returns it with ``folder`` a temporary folder; the catalog's
    ``ReportSetDataset`` moves that folder into place."""

    metrics: dict[str, float]
    report: EvaluationReport
    folder: Path

    @property
    def mlflow_run_id(self) -> str | None:
        return self.report.mlflow_run_id


def _relocated(value: Any, old: str, new: str) -> Any:
    """``value`` (JSON data) with every string path under ``old`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: _relocated(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocated(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


class ReportSetDataset(AbstractDataset):
    """``folder`` (pictures and details), ``metrics`` and ``report`` (JSON files, inside the
    folder or beside it), saved as one change (``dinoflow.files.swap_in``): a kill mid-save
    leaves the previous set whole, and the next load or save finishes a committed swap.

    save(ReportSet): the set's folder is moved in and the report's paths point into ``folder``.
    load() -> ReportSet (``optional: true``: None when the set was never written).
    """

    def __init__(self, folder: str, metrics: str, report: str, optional: bool = False,
                 metadata: dict | None = None):
        self._folder, self._optional, self.metadata = Path(folder), optional, metadata
        self._files = {"metrics": Path(metrics), "report": Path(report)}

    def _inside(self, path: Path) -> Path | None:
        """``path`` relative to the folder, or None when it lies beside it."""
        try:
            return path.relative_to(self._folder)
        except ValueError:
            return None

    def save(self, data: ReportSet) -> None:
        recover_swaps(self._folder.parent)
        staging = staging_folder(self._folder)
        shutil.copytree(data.folder, staging, dirs_exist_ok=True)
        report = _relocated(data.report.model_dump(mode="json"), str(data.folder), str(self._folder))
        beside = {}
        for name, content in (("metrics", data.metrics), ("report", report)):
            path = self._files[name]
            inside = self._inside(path)
            if inside is None:  # written into the staging folder, copied out at the swap
                inside = Path(f".{name}-{path.name}")
                beside[str(inside)] = path
            atomic_write_json(staging / inside, content)
        swap_in(staging, self._folder, beside)
        for name in beside:
            (self._folder / name).unlink(missing_ok=True)
        shutil.rmtree(data.folder, ignore_errors=True)

    def load(self) -> ReportSet | None:
        recover_swaps(self._folder.parent)
        missing = [str(p) for p in self._files.values() if not p.is_file()]
        if missing:
            if self._optional:
                return None
            raise DatasetError(f"{', '.join(missing)}: not written yet (run the evaluation first)")
        metrics = json.loads(self._files["metrics"].read_text())
        report = EvaluationReport.model_validate_json(self._files["report"].read_text())
        return ReportSet(metrics, report, self._folder)

    def _exists(self) -> bool:
        return all(p.is_file() for p in self._files.values())

    def _describe(self) -> dict[str, Any]:
        return {"folder": str(self._folder), **{k: str(v) for k, v in self._files.items()}}
