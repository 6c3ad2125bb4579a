"""Self-supervised methods the one trainer runs (``dinoflow.training.trainer``): each builds its
networks and losses, turns a batch into named loss terms, moves its teacher and names its state.

- ``base``: the ``Method`` protocol, ``StepContext``, ``StepTerms``;
- ``dinov2``: DINOv2 (DINO + iBOT + KoLeo, EMA teacher), Gram anchoring as an option;
- ``distillation``: a frozen teacher distilled into a smaller student;
- ``frozen_teacher``: that teacher (backbone and heads that never change).
"""

from dinoflow.methods.base import Method, StepContext, StepTerms
from dinoflow.methods.dinov2 import DINOv2
from dinoflow.methods.distillation import Distillation

__all__ = ["DINOv2", "Distillation", "Method", "StepContext", "StepTerms"]
