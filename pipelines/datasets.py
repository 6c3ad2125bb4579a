"""Catalog datasets for outputs that one pipeline makes and another may run without."""

from __future__ import annotations

from typing import Any

from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset


class OptionalCSVDataset(CSVDataset):
    """A CSV that loads as None when the file is absent (e.g. pretrain run without curation)."""

    def load(self) -> Any:
        return super().load() if self._exists() else None


class OptionalJSONDataset(JSONDataset):
    """A JSON file that loads as None when absent (e.g. evaluation of a model given by parameter)."""

    def load(self) -> Any:
        return super().load() if self._exists() else None
