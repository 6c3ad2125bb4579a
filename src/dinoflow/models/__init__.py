"""Networks: the DINOv2 ViT backbone and the DINO projection head."""

from dinoflow.models.heads import DINOHead
from dinoflow.models.vit import (
    VIT_PRESETS,
    DinoVisionTransformer,
    build_backbone,
    load_backbone,
    save_backbone,
)

__all__ = [
    "VIT_PRESETS",
    "DINOHead",
    "DinoVisionTransformer",
    "build_backbone",
    "load_backbone",
    "save_backbone",
]
