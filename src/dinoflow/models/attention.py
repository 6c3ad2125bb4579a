"""Softmax attention for the short token sequences of small-image ViTs on CPU.

PyTorch's CPU flash-attention kernel runs a 50-token, 32-dim-head attention at about a sixth
of the machine's matmul rate, and autograd through ``q @ k.T`` on timm's strided q/k/v views
splits every batched matmul into one copy per matrix. This module does the same arithmetic
as ``F.scaled_dot_product_attention`` (no mask, no dropout) with contiguous batched matmuls
and a hand-written backward that keeps every operand contiguous. Measured on the CPU
profile's shapes: ``benchmarks/bench_attention.py``.
"""

from __future__ import annotations

import torch

__all__ = ["short_attention"]


class _ShortAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over heads, from and to the linear layers' layouts.

    The scale rides in the batched matmuls (``baddbmm``'s alpha), so q is never rescaled.
    Written without ``out=`` views so that ``torch.compile`` traces it as it runs eagerly.
    """

    @staticmethod
    def forward(ctx, q_lin: torch.Tensor, kv_lin: torch.Tensor, num_heads: int) -> torch.Tensor:
        b, lq, width = q_lin.shape
        lk, h = kv_lin.shape[1], num_heads
        d = width // h
        q = q_lin.view(b, lq, h, d).transpose(1, 2).reshape(b * h, lq, d)
        kv = kv_lin.view(b, lk, 2, h, d).permute(2, 0, 3, 1, 4).reshape(2, b * h, lk, d)
        k, v = kv[0], kv[1]
        zero = q.new_zeros(1, 1, 1)  # beta = 0: baddbmm ignores it
        attn = torch.softmax(
            torch.baddbmm(zero, q, k.transpose(1, 2), beta=0.0, alpha=d**-0.5), dim=-1
        )  # (B*H, Lq, Lk)
        out = torch.bmm(attn, v).view(b, h, lq, d).transpose(1, 2).reshape(b, lq, width)
        ctx.save_for_backward(q, kv, attn)
        ctx.num_heads = h
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, kv, attn = ctx.saved_tensors
        h = ctx.num_heads
        bh, lq, d = q.shape
        b, lk, width, scale = bh // h, kv.shape[2], h * d, d**-0.5
        k, v = kv[0], kv[1]
        go = grad_out.reshape(b, lq, h, d).transpose(1, 2).reshape(bh, lq, d)
        grad_v = torch.bmm(attn.transpose(1, 2), go)
        grad_s = torch._softmax_backward_data(
            torch.bmm(go, v.transpose(1, 2)), attn, -1, attn.dtype
        )
        zero = q.new_zeros(1, 1, 1)
        grad_k = torch.baddbmm(zero, grad_s.transpose(1, 2), q, beta=0.0, alpha=scale)
        grad_q = torch.baddbmm(zero, grad_s, k, beta=0.0, alpha=scale)
        grad_q = grad_q.view(b, h, lq, d).transpose(1, 2).reshape(b, lq, width)
        grad_kv = torch.stack((grad_k, grad_v)).view(2, b, h, lk, d).permute(1, 3, 0, 2, 4)
        return grad_q, grad_kv.reshape(b, lk, 2 * width), None


def short_attention(q_lin: torch.Tensor, kv_lin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head softmax attention, scale 1/sqrt(head dim), no mask.

    q_lin (B, Lq, H*d): queries as a linear layer writes them (heads side by side);
    kv_lin (B, Lk, 2*H*d): keys then values, as the k/v rows of timm's fused qkv layer write them.
    Returns (B, Lq, H*d), heads side by side, ready for the output projection. Equal to
    ``F.scaled_dot_product_attention`` on the (B, H, L, d) views within float tolerance.
    """
    if q_lin.dim() != 3 or kv_lin.dim() != 3 or q_lin.shape[0] != kv_lin.shape[0]:
        raise ValueError(
            f"q_lin (B, Lq, W) and kv_lin (B, Lk, 2W) expected, got "
            f"{tuple(q_lin.shape)} and {tuple(kv_lin.shape)}"
        )
    if kv_lin.shape[2] != 2 * q_lin.shape[2]:
        raise ValueError(
            f"kv_lin must be twice as wide as q_lin (keys, values), got "
            f"{kv_lin.shape[2]} and {q_lin.shape[2]}"
        )
    if q_lin.shape[2] % num_heads:
        raise ValueError(f"width {q_lin.shape[2]} does not split into {num_heads} heads")
    return _ShortAttention.apply(q_lin, kv_lin, num_heads)
