"""Distillation: a small student from a big frozen teacher, evaluated beside it and registered."""

from dinoflow.pipelines.distillation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
