"""Tuning: an Optuna study over pretraining parameters (teacher schedules...), trials nested in MLflow."""

from dinoflow.pipelines.tuning.pipeline import create_pipeline

__all__ = ["create_pipeline"]
