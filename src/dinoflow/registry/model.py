"""The registered model ``RegisteredBackbone``: a DINOv2 backbone and its preprocessing.

It is pickled by ``mlflow.pytorch`` under the class path ``dinoflow.registry.RegisteredBackbone``
(the class says so: ``__module__``), the path every registered version is stored under;
unpickling it only imports ``dinoflow.registry``, which imports no MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dinoflow.data.transforms import DEFAULT_CROP_RATIO
from dinoflow.weights import hash_tensors

__all__ = ["PREPROCESSING", "RegisteredBackbone", "weights_sha256"]

PREPROCESSING = (
    "images: uint8 (B, C, H, W) or (B, H, W) -> model.preprocess(images): channels matched to "
    "in_chans (grey repeated / RGB to luma), the shorter side resized to "
    "round(image_size / crop_ratio) (bilinear, antialiased; aspect kept; an image whose shorter "
    "side is image_size is not resized), the centre image_size x image_size crop kept, "
    "scaled to [0, 1], normalised with mean/std (per channel) -> float32 (B, in_chans, S, S). "
    "forward / forward_patches take that tensor; any H, W that are multiples of patch_size work "
    "(position embeddings are resampled)."
)


class RegisteredBackbone(nn.Module):
    """The registered model: a DINOv2 backbone and its preprocessing.

    forward(x (B, C, H, W) float, preprocessed) -> CLS embedding after the final norm (B, D)
    forward_patches(x) -> patch tokens after the final norm (B, N, D), N = (H/p)(W/p)
    preprocess(uint8 images) -> x as the backbone saw it in training (see ``preprocessing``)
    embed(uint8 images) -> forward(preprocess(images))

    Attributes: mean, std (in [0, 1] units, one per channel or one for all), image_size (the
    centre crop), crop_ratio (of the crop to the resized shorter side), in_chans, patch_size,
    embed_dim, depth, preprocessing (the text above).
    """

    def __init__(
        self,
        backbone: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        channels: int | None = None,
        crop_ratio: float = DEFAULT_CROP_RATIO,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must have the same length")
        self.image_size = int(image_size)
        self.in_chans = int(channels or getattr(backbone, "in_chans", len(self.mean)))
        self.patch_size = int(backbone.patch_size)
        self.embed_dim = int(backbone.embed_dim)
        self.depth = int(backbone.depth)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of {self.patch_size}")
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.crop_ratio = float(crop_ratio)
        self.preprocessing = PREPROCESSING

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a pickled version without crop_ratio gets the default
        state.setdefault("crop_ratio", DEFAULT_CROP_RATIO)
        super().__setstate__(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) preprocessed -> CLS embedding (B, D)."""
        return self.backbone.forward_features(x)["x_norm_clstoken"]

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) preprocessed -> patch tokens (B, N, D)."""
        return self.backbone.forward_features(x)["x_norm_patchtokens"]

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The backbone's last n blocks: n tuples (patch tokens (B, N, D), CLS (B, D))."""
        return self.backbone.get_intermediate_layers(x, n)

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, C, H, W) or (B, H, W) -> float32 (B, in_chans, image_size, image_size): the
        centre crop at crop_ratio (``dinoflow.data.transforms.resize_center_crop``)."""
        from dinoflow.evaluation.features import preprocess

        x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.dtype != torch.uint8:
            raise TypeError(f"preprocess takes uint8 images, got {x.dtype}")
        return preprocess(x, self.image_size, self.mean, self.std, self.in_chans, self.crop_ratio)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 images -> CLS embeddings (B, D), in eval mode."""
        device = next(self.parameters()).device
        return self(self.preprocess(images).to(device))

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> RegisteredBackbone:
        """From pretrain_summary.json: the teacher backbone file (``dinoflow.artifacts.load_model``)
        and its mean/std/size/channels."""
        from dinoflow.artifacts import load_model

        path = summary.get("teacher_backbone")
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"pretrain_summary.teacher_backbone: {path!r} does not exist "
                "(run the pretrain pipeline first)"
            )
        backbone = load_model(path, key="pretrain_summary.teacher_backbone").backbone
        return cls(
            backbone,
            summary["mean"],
            summary["std"],
            summary["image_size"],
            summary.get("channels"),
        )


# Pickled (mlflow.pytorch, "pickle" format) under the path versions registered before the split
# hold: new versions load with older code, older versions with this one.
RegisteredBackbone.__module__ = "dinoflow.registry"


def weights_sha256(model: RegisteredBackbone) -> str:
    """A hash of what the registered model computes: every tensor of the backbone (by name) and
    the preprocessing. The same weights registered twice give the same hash (the default
    crop_ratio adds nothing: versions registered before it existed keep their hash)."""
    preprocessing = [model.mean, model.std, model.image_size, model.in_chans]
    if model.crop_ratio != DEFAULT_CROP_RATIO:
        preprocessing.append(model.crop_ratio)
    digest = hashlib.sha256(json.dumps(preprocessing).encode())
    return hash_tensors(digest, model.backbone.state_dict()).hexdigest()[:32]
