"""Export: the champion backbone as ONNX and as a timm state dict (data/06_models/export/)."""

from dinoflow.pipelines.export.pipeline import create_pipeline

__all__ = ["create_pipeline"]
