"""The frozen teacher of a distillation: a backbone and its heads that never change.

DINOv2 section 5: the large model is a frozen teacher (eval mode, no gradient, no EMA update);
the student learns its head outputs. A teacher without heads (a released backbone) either gets
heads fitted first or teaches its features directly (``dinoflow.methods.distillation``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from dinoflow.models.heads import DINOHead
from dinoflow.weights import hash_tensors

__all__ = ["FrozenTeacher", "backbone_flops", "heads_from_state"]


class FrozenTeacher(nn.Module):
    """Backbone + DINO head + iBOT head (None: the DINO head serves both; no DINO head: headless),
    always in eval mode, without gradients, drop-path off.

    ``teacher_forward(global_crops (2B, C, G, G))`` -> (cls (2B, K), patches (2B * N, K)): head
    logits of the CLS token and of every patch token (row-major (crop, patch)); headless, the
    final-norm features (2B, D) and (2B * N, D) instead.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dino_head: nn.Module | None = None,
        ibot_head: nn.Module | None = None,
    ):
        super().__init__()
        if dino_head is None and ibot_head is not None:
            raise ValueError("a teacher with an iBOT head needs its DINO head too")
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head
        for module in self.modules():
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stays in eval mode whatever is asked (a frozen teacher has no training mode)."""
        return super().train(False)

    @property
    def has_heads(self) -> bool:
        return self.dino_head is not None

    def prototypes(self) -> tuple[int, int | None]:
        """(K of the DINO head, K of a separate iBOT head or None)."""
        if self.dino_head is None:
            raise ValueError("a headless teacher has no prototypes")
        return self.dino_head.out_dim, None if self.ibot_head is None else self.ibot_head.out_dim

    def teacher_forward(self, global_crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.forward_features(global_crops)
        cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"].flatten(0, 1)
        if self.dino_head is None:
            return cls, patches
        if self.ibot_head is None:  # shared head: one pass
            logits = self.dino_head(torch.cat([cls, patches]))
            return logits[: cls.shape[0]], logits[cls.shape[0] :]
        return self.dino_head(cls), self.ibot_head(patches)

    def digest(self) -> str:
        """Hash of every tensor of the teacher (its identity in the run's fingerprint)."""
        return hash_tensors(hashlib.sha256(), self.state_dict()).hexdigest()[:16]


def _head_from_state(state: Mapping[str, torch.Tensor], in_dim: int, name: str) -> DINOHead:
    """A ``DINOHead`` of the sizes its state dict implies, holding those weights."""
    try:
        prototypes = state["last_layer.parametrizations.weight.original1"]  # (K, bottleneck)
    except KeyError:
        raise ValueError(
            f"{name}: not a DINO head state dict (keys {sorted(state)[:4]}...)"
        ) from None
    linears = sorted(
        (k for k in state if k.startswith("mlp.") and k.endswith(".weight")),
        key=lambda k: int(k.split(".")[1]) if k.count(".") == 2 else 0,
    )
    if not linears:
        raise ValueError(f"{name}: no MLP layer in the head's state dict")
    first = state[linears[0]]
    hidden = first.shape[0] if len(linears) > 1 else 1
    if first.shape[1] != in_dim:
        raise ValueError(
            f"{name}: the head takes {first.shape[1]}-d tokens, the backbone gives {in_dim}"
        )
    head = DINOHead(in_dim, prototypes.shape[0], hidden, prototypes.shape[1], len(linears))
    head.load_state_dict(dict(state))
    return head


def heads_from_state(
    state: Mapping[str, Mapping[str, torch.Tensor]], in_dim: int
) -> tuple[DINOHead, DINOHead | None]:
    """``teacher_heads.pt`` ({"dino_head": state dict, optional "ibot_head"}) -> the heads."""
    if "dino_head" not in state:
        raise ValueError(
            f"a heads file holds 'dino_head' (and maybe 'ibot_head'); got {sorted(state)}"
        )
    ibot = state.get("ibot_head")
    return (
        _head_from_state(state["dino_head"], in_dim, "dino_head"),
        None if ibot is None else _head_from_state(ibot, in_dim, "ibot_head"),
    )


def backbone_flops(backbone: nn.Module, image_size: int) -> int:
    """FLOPs of one forward of one image (1, C, S, S) (``torch.utils.flop_counter``, a
    multiply-add counted as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(backbone.parameters())
    x = torch.zeros(1, int(backbone.in_chans), image_size, image_size, device=param.device)
    was_training = backbone.training
    backbone.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(x)
    backbone.train(was_training)
    return int(counter.get_total_flops())
