"""Evaluation: kNN, linear probe, linear segmentation and feature pictures of a teacher backbone."""

from dinoflow.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
