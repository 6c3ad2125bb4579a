"""DINOv2 losses: teacher targets (centering), DINO (CLS), iBOT (patches), KoLeo."""

from dinoflow.losses.centering import SoftmaxCentering, sinkhorn_knopp
from dinoflow.losses.dino import DINOLoss
from dinoflow.losses.ibot import IBOTPatchLoss, masked_token_weights
from dinoflow.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "SoftmaxCentering",
    "masked_token_weights",
    "sinkhorn_knopp",
]
