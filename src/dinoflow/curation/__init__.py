"""Data curation: ingest, validate, filter, deduplicate, decontaminate, balance (DINOv2 recipe).

``curate(splits, cfg)`` runs every step; the Kedro pipeline ``curation`` runs them as nodes.
Heavy dependencies (faiss, imagehash, great_expectations, matplotlib, timm, mlflow) are imported
inside the functions that need them.
"""

from dinoflow.curation.config import CurationConfig, curation_config
from dinoflow.curation.curate import (
    ALL_REASONS,
    CurationResult,
    balanced_sampling,
    curate,
    deduplicate,
    embed,
    ingest,
    manifest_of,
    quality,
    quarantine_of,
    validate,
)
from dinoflow.curation.validate import CurationValidationError

__all__ = [
    "ALL_REASONS",
    "CurationConfig",
    "CurationResult",
    "CurationValidationError",
    "balanced_sampling",
    "curate",
    "curation_config",
    "deduplicate",
    "embed",
    "ingest",
    "manifest_of",
    "quality",
    "quarantine_of",
    "validate",
]
