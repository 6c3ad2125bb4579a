"""Catalog datasets for dinoflow's own artefacts.

- ``ResultDataset``: a typed job result (``dinoflow.results``: PretrainSummary, EvaluationReport,
  RegistrationDecision) as JSON, written atomically; ``optional: true`` loads None when absent
  (e.g. evaluation of a model given by parameter, without a pretrain run).
- ``BackboneDataset``: the trained teacher backbone (``dinoflow.models.vit.save_backbone`` file),
  loaded as the ``DinoVisionTransformer`` it holds.
- ``AtomicJSONDataset``: a plain JSON dict written atomically (metrics.json).
- ``OptionalCSVDataset``: a CSV that loads as None when absent (pretrain without curation).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset
from kedro_datasets.pandas import CSVDataset

from dinoflow.files import atomic_write_json


class OptionalCSVDataset(CSVDataset):
    """A CSV that loads as None when the file is absent (e.g. pretrain run without curation)."""

    def load(self) -> Any:
        return super().load() if self._exists() else None


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


class BackboneDataset(AbstractDataset):
    """The teacher backbone file; ``optional: true`` loads None when it is absent."""

    def __init__(self, filepath: str, optional: bool = False, metadata: dict | None = None):
        self._path, self._optional, self.metadata = Path(filepath), optional, metadata

    def load(self) -> Any:
        from dinoflow.models.vit import load_backbone

        if self._optional and not self._path.is_file():
            return None
        return load_backbone(self._path)

    def save(self, data: Any) -> None:
        from dinoflow.models.vit import save_backbone

        save_backbone(data, self._path)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "optional": self._optional}
