"""Data curation: ingest, validate, filter, deduplicate, decontaminate, balance (DINOv2 recipe).

The Kedro pipeline ``curation`` runs the steps as nodes (``dinoflow.pipelines.curation``).
Heavy dependencies (faiss, imagehash, great_expectations, matplotlib, timm, mlflow) are imported
inside the functions that need them.
"""

from dinoflow.curation.config import CurationConfig, curation_config
from dinoflow.curation.curate import (
    ALL_REASONS,
    balanced_sampling,
    deduplicate,
    embed,
    ingest,
    load_splits,
    manifest_of,
    outputs,
    quality,
    quarantine_of,
    validate,
)
from dinoflow.curation.validate import CurationValidationError

__all__ = [
    "ALL_REASONS",
    "CurationConfig",
    "CurationValidationError",
    "balanced_sampling",
    "curation_config",
    "deduplicate",
    "embed",
    "ingest",
    "load_splits",
    "manifest_of",
    "outputs",
    "quality",
    "quarantine_of",
    "validate",
]
