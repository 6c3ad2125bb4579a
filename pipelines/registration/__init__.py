"""Registration: log the teacher backbone to MLflow, register it, promote champion/challenger."""

from dinoflow.pipelines.registration.pipeline import create_pipeline

__all__ = ["create_pipeline"]
