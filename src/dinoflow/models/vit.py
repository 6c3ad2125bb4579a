"""DINOv2 Vision Transformer backbone built on timm's ``VisionTransformer``.

DINOv2 specifics (docs/method.md section 2) on top of timm:
- ``dynamic_img_size=True``: global and local crops of different sizes go through the same model
  (in separate forward calls). The patch position embeddings are interpolated to each crop's
  grid by ``interpolate_pos_embed``, which computes what dinov2's ``interpolate_pos_encoding``
  computes (bicubic, scale factor (grid + 0.1) / stored grid, no antialias, in float32; max abs
  difference 0 from the official code, and a released-layout ViT-S/14 forward within 1.9e-6 of
  it at 98, 224 and 518 px: docs/faithfulness.md), not by timm's run-time
  ``resample_abs_pos_embed`` (antialiased, no offset). ``interpolate_offset=0`` with
  ``interpolate_antialias=True`` is timm's resample exactly, and the setting of the released
  register models (dinov2's hub builds them so).
- ``no_embed_class=True``: only patches carry position embeddings. The reference model has a
  position embedding for CLS too, but it is a constant added to a learned constant, so it is
  folded into ``cls_token`` (see ``dinoflow.weights``). Register tokens carry none.
- a learnable ``mask_token`` (zero init) replaces masked patch embeddings BEFORE the position
  embeddings are added (iBOT).
- LayerScale (init 1e-5), LayerNorm eps 1e-6, uniform drop-path over all blocks.

Training shortcuts that compute the same numbers with less work (``DinoBlock``):
- drop-path on CPU runs a residual branch only on the samples that keep it (the keep/drop draws
  are timm's ``DropPath`` draws, in the same order), instead of computing it for every sample
  and multiplying the dropped ones by 0;
- ``forward_features(x, select=...)`` runs the last block only for the tokens whose output is
  used (CLS and the selected patches, e.g. the masked ones): every other token still serves as a
  key and value, so the kept outputs are unchanged;
- on CPU, sequences of at most ``SHORT_SEQUENCE_MAX`` tokens go through ``short_attention``
  (contiguous batched matmuls, hand-written backward) instead of PyTorch's flash kernel, which
  is slow on the 50- and 10-token crops of small images; longer ones and CUDA keep timm's path.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GluMlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from dinoflow.files import atomic_torch_save
from dinoflow.models.attention import short_attention

__all__ = [
    "BACKBONE_FORMAT",
    "interpolate_pos_embed",
    "VIT_PRESETS",
    "DinoBlock",
    "DinoVisionTransformer",
    "SwiGLUFFN",
    "build_backbone",
    "load_backbone",
    "save_backbone",
]

BACKBONE_FORMAT = "dinoflow-backbone-v1"
# up to this many tokens, CPU attention runs as contiguous batched matmuls (``short_attention``);
# longer sequences go to PyTorch's flash kernel (measured: benchmarks/bench_attention.py)
SHORT_SEQUENCE_MAX = 64

# name -> (embed_dim, depth, num_heads), the DINOv2 model family
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant": (1536, 40, 24),
}


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    stored_grid: tuple[int, int],
    new_grid: tuple[int, int],
    offset: float = 0.1,
    antialias: bool = False,
) -> torch.Tensor:
    """Patch position embeddings (1, Hs*Ws, D) on ``stored_grid`` -> (1, H*W, D) on ``new_grid``.

    dinov2's ``interpolate_pos_encoding``: unchanged on the stored grid; otherwise bicubic in
    float32 and cast back, with ``scale_factor`` ((H + offset) / Hs, (W + offset) / Ws) when
    offset != 0 (the scale factor, not the size, sets the sampling positions: the reference's
    "historical kludge" of 0.1) or ``size`` (H, W) when offset == 0; antialias as given
    (reference training and plain releases: offset 0.1, no antialias; register releases: 0, on).
    """
    hs, ws = int(stored_grid[0]), int(stored_grid[1])
    h, w = int(new_grid[0]), int(new_grid[1])
    if (h, w) == (hs, ws):
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, hs, ws, d).permute(0, 3, 1, 2)
    if offset:
        scale = (float(h + offset) / hs, float(w + offset) / ws)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        out = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
    if tuple(out.shape[-2:]) != (h, w):
        raise ValueError(
            f"interpolating a {hs}x{ws} grid with offset {offset} gave {tuple(out.shape[-2:])}, "
            f"not {(h, w)}"
        )
    return out.permute(0, 2, 3, 1).reshape(1, h * w, d).to(pos_embed.dtype)


class SwiGLUFFN(GluMlp):
    """DINOv2's fused SwiGLU FFN (``SwiGLUFFNFused``): ``w3(silu(x1) * x2)``, ``[x1, x2] = w12(x)``.

    The hidden width follows the reference: ``(int(hidden * 2 / 3) + 7) // 8 * 8`` with
    ``hidden = dim * mlp_ratio`` (1536 * 4 -> 4096 for ViT-g). ``fc1`` is the packed ``w12``
    (out 2 * hidden, gate first) and ``fc2`` is ``w3``, as in timm's ``SwiGLUPacked``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] | None = None,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        hidden = (int((hidden_features or in_features) * 2 / 3) + 7) // 8 * 8
        super().__init__(
            in_features,
            hidden_features=2 * hidden,
            out_features=out_features,
            act_layer=nn.SiLU,  # SwiGLU: always SiLU, whatever the block's activation
            norm_layer=norm_layer,
            bias=bias,
            drop=drop,
            gate_last=False,  # silu(first half) * second half, as the reference chunk(2)
            device=device,
            dtype=dtype,
        )

    def init_weights(self) -> None:
        """Plain trunc-normal init like every other Linear (timm's GLU gate init is not DINOv2's)."""
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        if self.fc1.bias is not None:
            nn.init.zeros_(self.fc1.bias)


def _keep_scale(drop_path: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A DropPath's per-sample residual scale (B,): 0 (dropped) or 1/keep_prob; None if inactive.

    Drawn and scaled exactly as timm's ``drop_path`` does (a (B, 1, 1) Bernoulli from the global
    RNG, divided by keep_prob), so the numbers are the ones timm would multiply by.
    """
    p = float(getattr(drop_path, "drop_prob", 0.0))
    if p == 0.0 or not drop_path.training:
        return None
    scale = x.new_empty((x.shape[0], 1, 1)).bernoulli_(1.0 - p)
    if getattr(drop_path, "scale_by_keep", True):
        scale.div_(1.0 - p)
    return scale.view(-1)


def _residual(x: torch.Tensor, branch, scale: torch.Tensor | None) -> torch.Tensor:
    """x + scale * branch(x) per sample (B, T, D), running branch only where scale != 0."""
    if scale is None:
        return x + branch(x)
    kept = scale.nonzero().squeeze(1)
    if kept.numel() in (0, x.shape[0]):  # nothing to skip (all dropped: zero grads, as timm)
        return x + branch(x) * scale.view(-1, 1, 1)
    y = branch(x.index_select(0, kept)) * scale.index_select(0, kept).view(-1, 1, 1)
    return x.index_add(0, kept, y)


class DinoBlock(Block):
    """timm's ``Block`` (same parameters, state dict and numbers) doing less work in training.

    - drop-path on CPU: a residual branch runs only on the samples that keep it, instead of on
      every sample with the dropped ones multiplied by 0 (same draws, in timm's order);
    - ``forward(x, rows=rows)``, rows (B, T) bool: the block's outputs for the selected tokens
      only, (R, D) in row-major (sample, token) order; every token still acts as key and value.
    ``forward(x)``: (B, T, D) -> (B, T, D).
    """

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if rows is not None:
            return self._forward_rows(x, rows)
        # on CUDA the nonzero() of the sample subset would sync the host: timm's path there
        if attn_mask is not None or x.device.type != "cpu":
            return super().forward(x, attn_mask=attn_mask)
        # draws in timm's order: drop_path1, then drop_path2 (the branches use no randomness)
        x = _residual(
            x, lambda t: self.ls1(self._attention(self.norm1(t))), _keep_scale(self.drop_path1, x)
        )
        return _residual(
            x, lambda t: self.ls2(self.mlp(self.norm2(t))), _keep_scale(self.drop_path2, x)
        )

    def _short_path(self, h: torch.Tensor) -> bool:
        """Whether ``short_attention`` stands in for timm's attention on h (B, T, D)."""
        a = self.attn
        return (
            h.device.type == "cpu"
            and h.shape[1] <= SHORT_SEQUENCE_MAX
            and isinstance(a.q_norm, nn.Identity)
            and isinstance(a.k_norm, nn.Identity)
            and getattr(a, "gate", None) is None
            and (a.attn_drop.p == 0.0 or not self.training)
        )

    def _qkv(self, h: torch.Tensor, q_rows: torch.Tensor | None = None):
        """(q_lin, kv_lin) of timm's fused qkv layer, q_lin for q_rows (R, D) if given."""
        a = self.attn
        w, b, width = a.qkv.weight, a.qkv.bias, a.attn_dim
        q_in = h if q_rows is None else q_rows
        q = F.linear(q_in, w[:width], None if b is None else b[:width])
        return q, F.linear(h, w[width:], None if b is None else b[width:])

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        """timm's ``Attention.forward(h)``, (B, T, D) -> (B, T, D), by ``short_attention`` on CPU."""
        return self._attention_short(h) if self._short_path(h) else self.attn(h)

    def _attention_short(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attn
        return a.proj_drop(a.proj(a.norm(short_attention(*self._qkv(h), a.num_heads))))

    # data-dependent shapes: run eagerly, inside the backbone's ``_last_block_selected``
    def _forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        s1, s2 = _keep_scale(self.drop_path1, x), _keep_scale(self.drop_path2, x)
        a = self.attn
        if getattr(a, "gate", None) is not None:
            raise NotImplementedError("row-selected forward of a gated attention")
        heads, head_dim, width = a.num_heads, a.head_dim, a.attn_dim
        flat = rows.flatten().nonzero().squeeze(1)  # (R,) indices into the B * T tokens
        sample = flat // t
        slot = (rows.cumsum(1) - 1).flatten()[flat]  # position among its sample's rows
        q_len = int(rows.sum(1).max())
        h = self.norm1(x)
        q, kv = self._qkv(h, h.flatten(0, 1)[flat])
        # queries padded per sample to q_len (padding rows are computed and dropped)
        qp = q.new_zeros(b, q_len, width).index_put((sample, slot), q)
        if self._short_path(h):
            o = short_attention(qp, kv, heads)[sample, slot]
        else:
            k, v = kv.view(b, t, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            qp = qp.view(b, q_len, heads, head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(a.q_norm(qp), a.k_norm(k), v)
            o = o.transpose(1, 2).reshape(b, q_len, width)[sample, slot]
        y = self.ls1(a.proj_drop(a.proj(a.norm(o))))
        xr = x.flatten(0, 1)[flat] + (y if s1 is None else y * s1[sample, None])
        y = self.ls2(self.mlp(self.norm2(xr)))
        return xr + (y if s2 is None else y * s2[sample, None])


def _check_arguments(img_size: int, patch_size: int, drop_path_rate: float, ffn: str) -> None:
    """Refuse an unknown ffn, a crop not a whole number of patches, a rate outside [0, 1)."""
    if ffn not in ("mlp", "swiglu"):
        raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
    if img_size % patch_size != 0:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")


def _timm_vit(kw: dict[str, Any]) -> VisionTransformer:
    """timm's VisionTransformer for ``DinoVisionTransformer``'s constructor kwargs (no drop path:
    timm decays it linearly, DINOv2 keeps it uniform; ``_set_drop_path`` sets it)."""
    mlp_kwargs: dict[str, Any] = {}
    if kw["ffn"] == "swiglu":
        mlp_kwargs = dict(mlp_layer=SwiGLUFFN, act_layer=nn.SiLU)
    return VisionTransformer(
        img_size=kw["img_size"],
        patch_size=kw["patch_size"],
        in_chans=kw["in_chans"],
        num_classes=0,
        global_pool="token",
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        mlp_ratio=kw["mlp_ratio"],
        qkv_bias=kw["qkv_bias"],
        init_values=kw["layerscale_init"] or None,
        class_token=True,
        no_embed_class=True,
        reg_tokens=kw["num_register_tokens"],
        dynamic_img_size=True,
        drop_path_rate=0.0,  # timm decays linearly; DINOv2 is uniform: _set_drop_path
        norm_layer=partial(nn.LayerNorm, eps=kw["layer_norm_eps"]),  # partial: picklable
        block_fn=DinoBlock,
        **mlp_kwargs,
    )


def _set_drop_path(vit: VisionTransformer, drop_path_rate: float) -> None:
    """The same stochastic-depth probability on every block (DINOv2)."""
    for blk in vit.blocks:
        blk.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        blk.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()


class DinoVisionTransformer(nn.Module):
    """ViT backbone for DINOv2 training. Inputs (B, C, H, W) with H, W multiples of patch_size.

    Args:
        img_size: side of the stored position-embedding grid in pixels (img_size // patch_size
            patches per side), usually the global crop. Other crop sizes are interpolated on
            the fly by ``interpolate_pos_embed``.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: usual ViT sizes.
        num_register_tokens: register tokens after CLS (no position embedding).
        layerscale_init: LayerScale initial value (None or 0 disables LayerScale).
        drop_path_rate: stochastic-depth probability, the same for every block (DINOv2).
        layer_norm_eps: LayerNorm epsilon.
        qkv_bias: bias in the qkv projection.
        ffn: "mlp" (GELU MLP) or "swiglu" (DINOv2's fused SwiGLU, used by ViT-g).
        interpolate_offset, interpolate_antialias: how position embeddings are interpolated to
            another grid, as dinov2's arguments of the same names (0.1 / False: the reference
            training and the plain releases; 0.0 / True: the register releases, = timm's).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 0,
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        ffn: str = "mlp",
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(img_size, patch_size, drop_path_rate, ffn)
        self._kwargs: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_register_tokens=num_register_tokens,
            layerscale_init=layerscale_init,
            drop_path_rate=drop_path_rate,
            layer_norm_eps=layer_norm_eps,
            qkv_bias=qkv_bias,
            ffn=ffn,
            interpolate_offset=interpolate_offset,
            interpolate_antialias=interpolate_antialias,
        )
        self.embed_dim = embed_dim
        self.interpolate_offset = float(interpolate_offset)
        self.interpolate_antialias = bool(interpolate_antialias)
        self.patch_size = patch_size
        self.depth = depth
        self.num_register_tokens = num_register_tokens
        self.in_chans = in_chans
        self.img_size = img_size

        self.vit = _timm_vit(self._kwargs)
        _set_drop_path(self.vit, drop_path_rate)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    # ------------------------------------------------------------------ helpers
    def backbone_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this architecture (used by save/load)."""
        return dict(self._kwargs)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + registers."""
        return 1 + self.num_register_tokens

    def _tokens(self, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """Patch-embed, mask, add position embeddings, prepend CLS/registers.

        x (B, C, H, W), masks (B, N) bool or None -> (B, 1 + R + N, D)
        """
        vit = self.vit
        x = vit.patch_embed(x)  # (B, h, w, D): dynamic_img_size keeps the grid for pos-embed
        if masks is not None:
            b, h, w, d = x.shape
            if masks.shape != (b, h * w):
                raise ValueError(f"masks must have shape {(b, h * w)}, got {tuple(masks.shape)}")
            m = masks.to(device=x.device, dtype=torch.bool).view(b, h, w, 1)
            x = torch.where(m, self.mask_token.to(x.dtype).view(1, 1, 1, d), x)
        x = self._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``_pos_embed`` (no_embed_class) with dinov2's interpolation of the grid.

        x (B, h, w, D) patch embeddings -> (B, 1 + R + h*w, D): patches + position embeddings
        interpolated to (h, w), then [CLS, registers, patches] (prefix tokens carry none).
        """
        vit = self.vit
        b, h, w, d = x.shape
        pos = interpolate_pos_embed(
            vit.pos_embed,
            tuple(vit.patch_embed.grid_size),
            (h, w),
            self.interpolate_offset,
            self.interpolate_antialias,
        )
        x = x.reshape(b, h * w, d) + pos
        prefix = [vit.cls_token.expand(b, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        return vit.pos_drop(torch.cat([*prefix, x], dim=1))

    # ------------------------------------------------------------------ forwards
    def forward_features(
        self,
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        pad_selected_to: int | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """x (B, C, H, W), masks (B, N) bool | None -> dict of normalised tokens.

        Returns x_norm_clstoken (B, D), x_norm_regtokens (B, R, D), x_norm_patchtokens (B, N, D)
        with N = (H/p)(W/p), and the masks passed in.

        select (B, N) bool: only CLS and the selected patch tokens are wanted. The last block
        then computes just those (the same values, less work) and the dict holds
        x_norm_clstoken (B, D) and x_norm_selected (M, D) = x_norm_patchtokens[select].
        pad_selected_to: x_norm_selected then has max(M, pad_selected_to) rows, padding (the
        norm of a zero token) after the M selected ones, so that what follows sees the same
        shape every step (torch.compile graphs stay static while M changes with the masks, as
        dinov2's ``upperbound``).
        """
        x = self._tokens(x, masks)
        if select is not None:
            return self._forward_selected(x, select, masks, pad_selected_to)
        x = self.vit.blocks(x)
        x = self.vit.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x[:, 0],
            "x_norm_regtokens": x[:, 1 : 1 + r],
            "x_norm_patchtokens": x[:, 1 + r :],
            "masks": masks,
        }

    def _forward_selected(
        self,
        x: torch.Tensor,
        select: torch.Tensor,
        masks: torch.Tensor | None,
        pad_selected_to: int | None,
    ) -> dict[str, torch.Tensor | None]:
        b, t, _ = x.shape
        p = self.num_prefix_tokens
        if select.shape != (b, t - p):
            raise ValueError(f"select must have shape {(b, t - p)}, got {tuple(select.shape)}")
        *body, last = self.vit.blocks
        for blk in body:
            x = blk(x)
        cls, selected = self._last_block_selected(last, x, select, pad_selected_to or 0)
        # the norm on what the loss reads (padding rows come out as the norm's bias)
        return {
            "x_norm_clstoken": self.vit.norm(cls),
            "x_norm_selected": self.vit.norm(selected),
            "masks": masks,
        }

    # data-dependent shapes (the selected rows): eager under torch.compile; what it returns has
    # the same shapes every step when padded
    @torch.compiler.disable
    def _last_block_selected(
        self, last: DinoBlock, x: torch.Tensor, select: torch.Tensor, pad_to: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS (B, D), selected (max(M, pad_to), D)) out of the last block, before the norm;
        zero rows after the M selected ones."""
        b, t, d = x.shape
        rows = torch.zeros(b, t, dtype=torch.bool, device=x.device)
        rows[:, 0] = True  # CLS (registers are not outputs of the loss)
        rows[:, self.num_prefix_tokens :] = select.to(device=x.device, dtype=torch.bool)
        out = last(x, rows=rows)  # (R, D), row-major (sample, token)
        is_cls = rows.cumsum(1).flatten()[rows.flatten()] == 1  # each sample's first row is CLS
        selected = out[~is_cls]
        if pad_to > selected.shape[0]:
            selected = torch.cat([selected, selected.new_zeros(pad_to - selected.shape[0], d)])
        return out[is_cls], selected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> CLS embedding after the final norm (B, D)."""
        return self.forward_features(x)["x_norm_clstoken"]

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> patch tokens after the final norm (B, N, D)."""
        return self.forward_features(x)["x_norm_patchtokens"]

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Outputs of the last n blocks, each through the final norm.

        x (B, C, H, W) -> list (oldest first) of n tuples (patch tokens (B, N, D), cls (B, D)).
        """
        if not 1 <= n <= self.depth:
            raise ValueError(f"n must be in [1, {self.depth}], got {n}")
        x = self._tokens(x, None)
        outs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, blk in enumerate(self.vit.blocks):
            x = blk(x)
            if i >= self.depth - n:
                y = self.vit.norm(x)
                outs.append((y[:, self.num_prefix_tokens :], y[:, 0]))
        return outs


def build_backbone(arch: str | None = None, **overrides: Any) -> DinoVisionTransformer:
    """Build a backbone from a preset name (see VIT_PRESETS) and/or explicit kwargs.

    ``vit_giant`` defaults to the SwiGLU FFN, as the released ViT-g/14. Explicit overrides win.
    """
    kwargs: dict[str, Any] = {}
    if arch is not None:
        if arch not in VIT_PRESETS:
            raise ValueError(f"unknown arch {arch!r}; known: {sorted(VIT_PRESETS)}")
        embed_dim, depth, num_heads = VIT_PRESETS[arch]
        kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        if arch == "vit_giant":
            kwargs["ffn"] = "swiglu"
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs)


def save_backbone(model: DinoVisionTransformer, path: str | os.PathLike[str]) -> None:
    """Write {"format", "kwargs", "state_dict"} atomically (temp file in the same dir + rename)."""
    payload = {
        "format": BACKBONE_FORMAT,
        "kwargs": model.backbone_kwargs(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_torch_save(payload, path)


def load_backbone(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> DinoVisionTransformer:
    """Rebuild a backbone written by ``save_backbone`` (weights_only load)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != BACKBONE_FORMAT:
        raise ValueError(f"{path}: not a {BACKBONE_FORMAT} file")
    kwargs = dict(payload["kwargs"])
    # a file whose kwargs name no interpolation setting was trained with timm's resample
    # (= offset 0, antialias)
    kwargs.setdefault("interpolate_offset", 0.0)
    kwargs.setdefault("interpolate_antialias", True)
    model = DinoVisionTransformer(**kwargs)
    model.load_state_dict(payload["state_dict"])
    return model
