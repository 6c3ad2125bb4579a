"""DinoVisionTransformer: shapes, masking, position embeddings, drop path, save/load."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed
from torch import nn

from dinoflow.models.vit import (
    BACKBONE_FORMAT,
    VIT_PRESETS,
    DinoVisionTransformer,
    build_backbone,
    load_backbone,
    save_backbone,
)


def tiny(**kw) -> DinoVisionTransformer:
    args = dict(img_size=28, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return DinoVisionTransformer(**args)


@pytest.mark.parametrize("n_reg", [0, 2])
def test_shapes_global_and_local_crops(n_reg: int) -> None:
    m = tiny(num_register_tokens=n_reg).eval()
    g = m.forward_features(torch.randn(3, 3, 28, 28))
    assert g["x_norm_clstoken"].shape == (3, 16)
    assert g["x_norm_regtokens"].shape == (3, n_reg, 16)
    assert g["x_norm_patchtokens"].shape == (3, 49, 16)
    assert g["masks"] is None
    xl = torch.randn(5, 3, 12, 12)  # local crop: 3x3 grid, same model
    loc = m.forward_features(xl)
    assert loc["x_norm_patchtokens"].shape == (5, 9, 16)
    assert m(xl).shape == (5, 16)
    assert m.forward_patches(xl).shape == (5, 9, 16)
    assert torch.equal(m(xl), loc["x_norm_clstoken"])


def test_intermediate_layers_last_equals_final_output() -> None:
    m = tiny(depth=3, num_register_tokens=1).eval()
    x = torch.randn(2, 3, 28, 28)
    outs = m.get_intermediate_layers(x, n=2)
    assert len(outs) == 2
    for patches, cls in outs:
        assert patches.shape == (2, 49, 16) and cls.shape == (2, 16)
    f = m.forward_features(x)
    torch.testing.assert_close(outs[-1][0], f["x_norm_patchtokens"], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[-1][1], f["x_norm_clstoken"], rtol=0, atol=1e-6)
    # the one before is block 1's output through the final norm, by hand
    t = m._tokens(x, None)
    t = m.vit.blocks[1](m.vit.blocks[0](t))
    torch.testing.assert_close(outs[0][1], m.vit.norm(t)[:, 0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        m.get_intermediate_layers(x, n=4)


@pytest.mark.parametrize("n_reg", [0, 2])
def test_masked_patches_do_not_see_their_pixels(n_reg: int) -> None:
    m = tiny(num_register_tokens=n_reg).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 28, 28)
    masks = torch.zeros(2, 49, dtype=torch.bool)
    masks[0, [0, 8, 20]] = True
    masks[1, [48]] = True
    x2 = x.clone()
    for b, idx in masks.nonzero().tolist():  # noise over the masked patches' pixels only
        r, c = divmod(idx, 7)
        x2[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = torch.randn(3, 4, 4) * 5
    with torch.no_grad():
        a = m.forward_features(x, masks)
        b = m.forward_features(x2, masks)
        unmasked = m.forward_features(x2)
        ref = m.forward_features(x)
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert torch.equal(a[k], b[k])
    assert a["masks"] is masks
    # without the mask the changed pixels do change the output (the test can fail)
    assert not torch.allclose(unmasked["x_norm_clstoken"], ref["x_norm_clstoken"])
    # and the mask changes the output compared to no mask
    assert not torch.allclose(a["x_norm_clstoken"], ref["x_norm_clstoken"])


def test_mask_token_replaces_embedding_before_pos_embed() -> None:
    m = tiny(num_register_tokens=1).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(1, 3, 28, 28)
    masks = torch.zeros(1, 49, dtype=torch.bool)
    masks[0, 10] = True
    with torch.no_grad():
        t = m._tokens(x, masks)
        emb = m.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (1, 49, D) by hand
    pos = m.vit.pos_embed[0]
    torch.testing.assert_close(t[0, 2 + 10], m.mask_token[0] + pos[10], rtol=0, atol=1e-6)
    torch.testing.assert_close(t[0, 2 + 11], emb[0, 11] + pos[11], rtol=0, atol=1e-6)


def test_pos_embed_interpolated_as_dinov2_for_other_grid_and_not_on_prefix_tokens() -> None:
    """Default: dinov2's interpolate_pos_encoding, bicubic with scale factor (3 + 0.1) / 7 and
    no antialias (written out here); not timm's antialiased resample, which differs."""
    m = tiny(num_register_tokens=2).eval()
    with torch.no_grad():
        m.vit.reg_token.normal_()
        m.vit.cls_token.normal_()
        m.vit.pos_embed.normal_()
        x = torch.randn(2, 3, 12, 12)
        t = m._tokens(x, None)  # (2, 1 + 2 + 9, D)
        emb = m.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        grid = m.vit.pos_embed.reshape(1, 7, 7, 16).permute(0, 3, 1, 2)
        pe = F.interpolate(grid, scale_factor=(3.1 / 7, 3.1 / 7), mode="bicubic", antialias=False)
        pe = pe.permute(0, 2, 3, 1).reshape(1, 9, 16)
        timm_pe = resample_abs_pos_embed(m.vit.pos_embed, new_size=[3, 3], old_size=[7, 7],
                                         num_prefix_tokens=0, interpolation="bicubic")
    torch.testing.assert_close(t[:, 3:], emb + pe, rtol=0, atol=1e-6)
    assert (pe - timm_pe).abs().max() > 0.05  # the two resamplings are not the same function
    # CLS and registers get no position embedding
    assert torch.equal(t[:, 0], m.vit.cls_token[0].expand(2, -1))
    assert torch.equal(t[:, 1:3], m.vit.reg_token.expand(2, -1, -1))
    # global crop: the stored grid, no interpolation
    with torch.no_grad():
        xg = torch.randn(1, 3, 28, 28)
        tg = m._tokens(xg, None)
        eg = m.vit.patch_embed.proj(xg).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tg[:, 3:], eg + m.vit.pos_embed, rtol=0, atol=1e-6)
    assert m.vit.pos_embed.shape == (1, 49, 16)


def test_offset_0_with_antialias_is_timms_resample_and_non_square_grids_work() -> None:
    """interpolate_offset 0 + antialias (the register releases' setting) gives timm's
    ``_pos_embed`` bit for bit; a non-square crop (12 x 20 px: 3 x 5 patches) gets the
    (3 + 0.1) / 7 and (5 + 0.1) / 7 scale factors."""
    m = tiny(num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True).eval()
    with torch.no_grad():
        m.vit.pos_embed.normal_()
        for hw in ((12, 12), (12, 20), (28, 28)):
            x = torch.randn(2, 3, *hw)
            timm_tokens = m.vit._pos_embed(m.vit.patch_embed(x))
            assert torch.equal(m._tokens(x, None), timm_tokens)
    d = tiny().eval()
    with torch.no_grad():
        d.vit.pos_embed.normal_()
        x = torch.randn(1, 3, 12, 20)
        t = d._tokens(x, None)
        emb = d.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        grid = d.vit.pos_embed.reshape(1, 7, 7, 16).permute(0, 3, 1, 2)
        pe = F.interpolate(grid, scale_factor=(3.1 / 7, 5.1 / 7), mode="bicubic", antialias=False)
    assert t.shape == (1, 1 + 15, 16)
    torch.testing.assert_close(t[:, 1:], emb + pe.permute(0, 2, 3, 1).reshape(1, 15, 16),
                               rtol=0, atol=1e-6)


def test_compiled_forward_equals_eager_at_several_crop_sizes() -> None:
    """The interpolation compiles (the stored grid and a non-square crop, recompiled per
    size), forward and backward."""
    m = tiny().train()
    with torch.no_grad():
        m.vit.pos_embed.normal_()
    compiled = torch.compile(m)
    for hw in ((28, 28), (12, 20)):
        x = torch.randn(2, 3, *hw)
        m.zero_grad()
        ref = m(x)
        ref.square().sum().backward()
        g_ref = m.vit.pos_embed.grad.clone()
        m.zero_grad()
        out = compiled(x)
        out.square().sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.vit.pos_embed.grad, g_ref, rtol=1e-4, atol=1e-6)


def test_uniform_drop_path_layerscale_norm_eps_fused_attention() -> None:
    m = tiny(depth=4, drop_path_rate=0.3, layerscale_init=0.25)
    for blk in m.vit.blocks:
        for dp in (blk.drop_path1, blk.drop_path2):
            assert isinstance(dp, DropPath) and dp.drop_prob == 0.3
        assert torch.equal(blk.ls1.gamma, torch.full((16,), 0.25))
        assert torch.equal(blk.ls2.gamma, torch.full((16,), 0.25))
        assert blk.attn.fused_attn  # F.scaled_dot_product_attention
    lns = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert len(lns) == 2 * 4 + 1 and all(ln.eps == 1e-6 for ln in lns)
    assert torch.equal(m.mask_token, torch.zeros(1, 16))
    d = tiny()
    assert all(isinstance(b.drop_path1, nn.Identity) for b in d.vit.blocks)
    assert torch.equal(d.vit.blocks[0].ls1.gamma, torch.full((16,), 1e-5))


def test_drop_path_active_in_train_only() -> None:
    m = tiny(drop_path_rate=0.5)
    x = torch.randn(4, 3, 28, 28)
    m.eval()
    with torch.inference_mode():  # the teacher's mode
        e1, e2 = m(x), m(x)
    assert torch.equal(e1, e2)
    m.train()
    torch.manual_seed(1)
    t1 = m(x)
    assert not torch.allclose(t1, e1)


def test_swiglu_ffn_matches_reference_formula() -> None:
    m = tiny(embed_dim=64, num_heads=2, ffn="swiglu", depth=1)
    mlp = m.vit.blocks[0].mlp
    hidden = (int(256 * 2 / 3) + 7) // 8 * 8  # 176, the reference SwiGLUFFNFused width
    assert mlp.fc1.weight.shape == (2 * hidden, 64) and mlp.fc2.weight.shape == (64, hidden)
    x = torch.randn(3, 5, 64)
    x12 = x @ mlp.fc1.weight.T + mlp.fc1.bias
    x1, x2 = x12[..., :hidden], x12[..., hidden:]
    ref = (F.silu(x1) * x2) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_build_backbone_presets() -> None:
    assert VIT_PRESETS["vit_small"] == (384, 12, 6)
    m = build_backbone("vit_small", depth=1, img_size=28, patch_size=14)
    assert (m.embed_dim, m.depth, m.vit.blocks[0].attn.num_heads) == (384, 1, 6)
    g = build_backbone("vit_giant", depth=1, img_size=28, patch_size=14)
    assert g.backbone_kwargs()["ffn"] == "swiglu" and g.embed_dim == 1536
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError):
        tiny(ffn="moe")


def test_save_load_round_trip(tmp_path) -> None:
    m = tiny(num_register_tokens=2, in_chans=1, drop_path_rate=0.1).eval()
    with torch.no_grad():
        m.mask_token.normal_()
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "sub" / "backbone.pt"
    save_backbone(m, path)
    assert os.listdir(path.parent) == ["backbone.pt"]  # no temp file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == BACKBONE_FORMAT
    assert payload["kwargs"] == m.backbone_kwargs()
    m2 = load_backbone(path).eval()
    x = torch.randn(2, 1, 28, 28)
    masks = torch.rand(2, 49) > 0.5
    with torch.no_grad():
        a, b = m.forward_features(x, masks), m2.forward_features(x, masks)
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert torch.equal(a[k], b[k])
    # a file written before the interpolation kwargs existed keeps timm's resample
    old = dict(payload, kwargs={k: v for k, v in payload["kwargs"].items()
                                if not k.startswith("interpolate_")})
    torch.save(old, tmp_path / "old.pt")
    m3 = load_backbone(tmp_path / "old.pt")
    assert (m3.interpolate_offset, m3.interpolate_antialias) == (0.0, True)
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a dinoflow-backbone-v1"):
        load_backbone(tmp_path / "bad.pt")


def test_autocast_bf16_forward_backward() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = tiny(num_register_tokens=1).to(device).train()
    x = torch.randn(2, 3, 28, 28, device=device)
    masks = torch.zeros(2, 49, dtype=torch.bool, device=device)
    masks[0, :10] = True
    with torch.autocast(device, dtype=torch.bfloat16):
        out = m.forward_features(x, masks)
        loss = out["x_norm_clstoken"].float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
