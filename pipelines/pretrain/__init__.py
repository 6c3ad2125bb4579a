"""Pretrain: DINOv2 student/teacher training on the (curated) train split."""

from dinoflow.pipelines.pretrain.pipeline import create_pipeline

__all__ = ["create_pipeline"]
