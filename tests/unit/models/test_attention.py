"""short_attention: the same numbers and gradients as PyTorch's scaled-dot-product attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinoflow.models.attention import short_attention


def _sdpa(q_lin: torch.Tensor, kv_lin: torch.Tensor, heads: int) -> torch.Tensor:
    b, lq, w = q_lin.shape
    d = w // heads
    q = q_lin.view(b, lq, heads, d).transpose(1, 2)
    k, v = kv_lin.view(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, w)


@pytest.mark.parametrize(("b", "lq", "lk", "heads", "d"),
                         [(6, 50, 50, 4, 32), (5, 10, 10, 2, 16), (3, 7, 50, 4, 8)])
def test_forward_and_gradients_equal_sdpa(b, lq, lk, heads, d) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, lq, heads * d, generator=g, requires_grad=True)
    kv = torch.randn(b, lk, 2 * heads * d, generator=g, requires_grad=True)
    grad_out = torch.randn(b, lq, heads * d, generator=g)

    out = short_attention(q, kv, heads)
    dq, dkv = torch.autograd.grad(out, (q, kv), grad_out)
    ref = _sdpa(q, kv, heads)
    rq, rkv = torch.autograd.grad(ref, (q, kv), grad_out)

    assert out.shape == (b, lq, heads * d) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, rq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dkv, rkv, rtol=1e-4, atol=1e-5)


def test_hand_written_backward_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: short_attention(a, b, 2), (q, kv))


def test_a_single_token_attends_to_itself_only() -> None:
    """One key: softmax weight 1, the output is that token's value whatever the query."""
    q, kv = torch.randn(4, 1, 8), torch.randn(4, 1, 16)
    torch.testing.assert_close(short_attention(q, kv, 2), kv[:, :, 8:])


def test_shapes_that_do_not_split_into_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="heads"):
        short_attention(torch.randn(2, 3, 10), torch.randn(2, 3, 20), 4)
    with pytest.raises(ValueError, match="kv_lin"):
        short_attention(torch.randn(2, 3, 8), torch.randn(2, 3, 8), 2)
