"""Backbone + heads as one module, so a whole student step is one forward (DDP-friendly)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dinoflow.models.heads import DINOHead
from dinoflow.models.vit import DinoVisionTransformer


class SSLModel(nn.Module):
    """The student (or teacher): ViT backbone, DINO head and iBOT head (the same module if shared)."""

    def __init__(
        self, backbone: DinoVisionTransformer, dino_head: DINOHead, ibot_head: DINOHead | None
    ):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head  # None: the iBOT head is the DINO head

    def heads(self) -> dict[str, nn.Module]:
        heads = {"dino_head": self.dino_head}
        if self.ibot_head is not None:
            heads["ibot_head"] = self.ibot_head
        return heads

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None,
        masks: torch.Tensor,
        max_masked: int | None = None,
        patches: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Student pass.

        global_crops (2B, C, G, G), local_crops (N*B, C, L, L) or None, masks (2B, P) bool.
        Returns global_logits (2B, K), local_logits (N*B, K), masked_logits (M', K): the M masked
        patches in row-major (crop, patch) order, then padding up to M' = max(M, max_masked)
        rows (the first M are the real ones), global_cls (2B, D) backbone CLS (for KoLeo), and
        with ``patches`` global_patches (2B, P, D): every patch token of the masked global crops.
        """
        if patches:
            out_g = self.backbone.forward_features(global_crops, masks=masks)
            all_patches = out_g["x_norm_patchtokens"]
            masked_tokens = self._pad(all_patches[masks], max_masked)
        else:  # only CLS and the masked patches leave the backbone (its last block skips the rest)
            out_g = self.backbone.forward_features(
                global_crops, masks=masks, select=masks, pad_selected_to=max_masked
            )
            masked_tokens = out_g["x_norm_selected"]
        cls_g = out_g["x_norm_clstoken"]
        cls_l = None
        if local_crops is not None and local_crops.numel():
            n_patches = (local_crops.shape[-2] // self.backbone.patch_size) * (
                local_crops.shape[-1] // self.backbone.patch_size
            )
            cls_only = torch.zeros(
                local_crops.shape[0], n_patches, dtype=torch.bool, device=local_crops.device
            )
            cls_l = self.backbone.forward_features(local_crops, select=cls_only)["x_norm_clstoken"]
        n_g, n_l = cls_g.shape[0], 0 if cls_l is None else cls_l.shape[0]
        if self.ibot_head is None:  # shared head: one pass over every token that needs it
            tokens = torch.cat([cls_g] + ([cls_l] if cls_l is not None else []) + [masked_tokens])
            logits = self.dino_head(tokens)
            global_logits, local_logits, masked_logits = logits.split(
                [n_g, n_l, masked_tokens.shape[0]]
            )
        else:
            cls_tokens = cls_g if cls_l is None else torch.cat([cls_g, cls_l])
            global_logits, local_logits = self.dino_head(cls_tokens).split([n_g, n_l])
            masked_logits = self.ibot_head(masked_tokens)
        out = {
            "global_logits": global_logits,
            "local_logits": local_logits,
            "masked_logits": masked_logits,
            "global_cls": cls_g,
        }
        if patches:
            out["global_patches"] = all_patches
        return out

    def _pad(self, selected: torch.Tensor, max_masked: int | None) -> torch.Tensor:
        """Rows up to ``max_masked`` after the selected ones, as the selecting pass pads them
        (the norm of a zero token)."""
        missing = (max_masked or 0) - selected.shape[0]
        if missing <= 0:
            return selected
        return torch.cat(
            [selected, self.backbone.vit.norm(selected.new_zeros(missing, selected.shape[1]))]
        )

    def teacher_forward(
        self, global_crops: torch.Tensor, masks: torch.Tensor, max_masked: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher pass on unmasked global crops: CLS logits (2B, K), logits at the masked
        positions (M', K), padded as the student's ``masked_logits``."""
        out = self.backbone.forward_features(global_crops, select=masks, pad_selected_to=max_masked)
        cls, patches = out["x_norm_clstoken"], out["x_norm_selected"]
        if self.ibot_head is None:
            logits = self.dino_head(torch.cat([cls, patches]))
            return logits[: cls.shape[0]], logits[cls.shape[0] :]
        return self.dino_head(cls), self.ibot_head(patches)


def make_teacher(student: SSLModel) -> SSLModel:
    """A copy of the student with no gradient, in eval mode, drop-path off (EMA-updated only)."""
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    teacher.requires_grad_(False)
    return teacher.eval()
