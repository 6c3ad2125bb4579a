"""Kedro pipeline ``curation``: raw image source -> curated manifest, quarantine, report."""

from dinoflow.pipelines.curation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
