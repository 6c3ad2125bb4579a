"""DINOHead: structure, init, normalised prototypes, the weight-norm magnitude (trained or fixed)."""

from __future__ import annotations

import torch
from torch import nn

from dinoflow.models.heads import DINOHead


def test_output_shape_and_structure() -> None:
    torch.manual_seed(0)
    h = DINOHead(in_dim=12, out_dim=50, hidden_dim=20, bottleneck_dim=8, nlayers=3)
    assert h(torch.randn(4, 12)).shape == (4, 50)
    assert h(torch.randn(2, 3, 12)).shape == (2, 3, 50)
    kinds = [type(m) for m in h.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.out_features for m in h.mlp if isinstance(m, nn.Linear)] == [20, 20, 8]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in h.modules())
    assert h.last_layer.bias is None and h.last_layer.weight.shape == (50, 8)
    for m in h.mlp:
        if isinstance(m, nn.Linear):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))

    # trunc_normal_(std=0.02) as the reference (cut at +-2 absolute, so ~normal(0, 0.02))
    big = DINOHead(in_dim=64, out_dim=4, hidden_dim=64, bottleneck_dim=64, nlayers=3)
    for m in big.mlp:
        if isinstance(m, nn.Linear):
            assert 0.018 < m.weight.std().item() < 0.022
            assert abs(m.weight.mean().item()) < 0.002
    names = [n for n, _ in h.named_parameters()]
    assert "last_layer.parametrizations.weight.original0" in names


def test_output_is_normalised_bottleneck_times_unit_prototypes() -> None:
    torch.manual_seed(0)
    h = DINOHead(in_dim=6, out_dim=5, hidden_dim=7, bottleneck_dim=4, nlayers=2)
    x = torch.randn(3, 6)
    z = h.mlp(x)
    v = h.last_layer.parametrizations.weight.original1  # (5, 4) direction
    out = h(x)
    for b in range(3):  # naive loop: cosine between bottleneck b and prototype k
        zn = z[b] / torch.sqrt((z[b] ** 2).sum())
        for k in range(5):
            wk = v[k] / torch.sqrt((v[k] ** 2).sum())
            torch.testing.assert_close(out[b, k], (zn * wk).sum(), rtol=1e-5, atol=1e-6)
    assert out.abs().max() <= 1.0 + 1e-6


def test_weight_norm_magnitude_fixed_at_one_and_not_trained_with_norm_last_layer() -> None:
    """DINOv1's norm_last_layer=True: g stays 1, the prototypes keep unit norm."""
    torch.manual_seed(0)
    h = DINOHead(in_dim=6, out_dim=5, hidden_dim=7, bottleneck_dim=4, norm_last_layer=True)
    g = h.last_layer.parametrizations.weight.original0
    assert g.shape == (5, 1) and torch.equal(g, torch.ones(5, 1)) and not g.requires_grad
    opt = torch.optim.SGD([p for p in h.parameters() if p.requires_grad], lr=10.0)
    h(torch.randn(8, 6)).pow(2).sum().backward()
    assert g.grad is None
    v = h.last_layer.parametrizations.weight.original1
    assert v.grad is not None and v.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(g, torch.ones(5, 1))
    torch.testing.assert_close(h.last_layer.weight.norm(dim=1), torch.ones(5))


def test_weight_norm_magnitude_starts_at_one_and_is_trained_by_default() -> None:
    """DINOv2 (the default): g starts at 1 and is trained; its gradient is, by the chain rule
    of weight = g * v / ||v||, sum_j dL/dw_kj * v_kj / ||v_k|| (checked by hand)."""
    torch.manual_seed(0)
    h = DINOHead(in_dim=6, out_dim=5, hidden_dim=7, bottleneck_dim=4)
    g = h.last_layer.parametrizations.weight.original0
    v = h.last_layer.parametrizations.weight.original1
    assert torch.equal(g, torch.ones(5, 1)) and g.requires_grad
    x = torch.randn(8, 6)
    z = torch.nn.functional.normalize(h.mlp(x), dim=-1).detach()
    out = h(x)
    out.pow(2).sum().backward()
    dw = 2 * out.detach().T @ z  # dL/dweight (5, 4)
    want = (dw * v.detach() / v.detach().norm(dim=1, keepdim=True)).sum(1, keepdim=True)
    torch.testing.assert_close(g.grad, want, rtol=1e-5, atol=1e-6)
    torch.optim.SGD([g], lr=0.1).step()
    assert not torch.equal(g, torch.ones(5, 1))
    torch.testing.assert_close(h.last_layer.weight.norm(dim=1, keepdim=True), g.detach())


def test_single_layer_variant() -> None:
    torch.manual_seed(0)
    h = DINOHead(in_dim=6, out_dim=9, hidden_dim=100, bottleneck_dim=3, nlayers=1)
    assert isinstance(h.mlp, nn.Linear) and h.mlp.weight.shape == (3, 6)
    x = torch.randn(2, 6)
    z = x @ h.mlp.weight.T  # bias is zero at init
    zn = z / z.norm(dim=1, keepdim=True)
    w = h.last_layer.parametrizations.weight.original1
    wn = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(h(x), zn @ wn.T, rtol=1e-5, atol=1e-6)
