"""Kedro's pipeline registry entry point; the pipelines live in ``dinoflow.pipelines``."""

from dinoflow.pipelines import register_pipelines

__all__ = ["register_pipelines"]
