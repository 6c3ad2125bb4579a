"""Loading released DINOv2 weights (official layout) into the timm-based backbone."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from dinoflow.models.vit import DinoVisionTransformer, save_backbone
from dinoflow.weights import load_released_weights, official_state_dict, save_official_layout


def randomised(**kw) -> DinoVisionTransformer:
    """Tiny backbone whose every parameter (tokens, LayerScale...) is random and non-trivial."""
    args = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    m = DinoVisionTransformer(**args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def fresh(**kw) -> DinoVisionTransformer:
    args = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    args.update(kw)
    torch.manual_seed(1)
    return DinoVisionTransformer(**args).eval()


def outputs(m: DinoVisionTransformer, x: torch.Tensor, masks=None) -> dict:
    with torch.no_grad():
        return m.forward_features(x, masks)


def assert_same_outputs(a: DinoVisionTransformer, b: DinoVisionTransformer, c: int = 3) -> None:
    x = torch.randn(2, c, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3:7] = True
    for xx, mm in ((x, None), (x, masks), (torch.randn(2, c, 8, 8), None)):
        oa, ob = outputs(a, xx, mm), outputs(b, xx, mm)
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
            torch.testing.assert_close(oa[k], ob[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "n_reg,chunks,ffn", [(0, 0, "mlp"), (4, 0, "mlp"), (2, 2, "mlp"), (0, 0, "swiglu")]
)
def test_official_layout_round_trip(tmp_path, n_reg: int, chunks: int, ffn: str) -> None:
    src = randomised(num_register_tokens=n_reg, ffn=ffn)
    path = tmp_path / "official.pth"
    save_official_layout(src, path, block_chunks=chunks)
    sd = torch.load(path, weights_only=True)
    assert sd["pos_embed"].shape == (1, 1 + 16, 16)  # includes the CLS position
    assert sd["mask_token"].shape == (1, 16) and sd["cls_token"].shape == (1, 1, 16)
    assert ("register_tokens" in sd) == (n_reg > 0) and "reg_token" not in sd
    blk = "blocks.1.1." if chunks else "blocks.1."
    assert f"{blk}ls1.gamma" in sd and f"{blk}attn.qkv.weight" in sd
    assert (f"{blk}mlp.w12.weight" in sd) == (ffn == "swiglu")
    dst = fresh(num_register_tokens=n_reg, ffn=ffn)
    report = load_released_weights(dst, path)
    assert report.source_format == "official" and report.ok
    assert report.pos_embed_resized is None
    assert len(report.loaded) == len(dst.state_dict())
    assert_same_outputs(src, dst)


def test_cls_position_is_added_to_cls_token_exactly(tmp_path) -> None:
    """Official forward: x = cat(cls, patches) + pos_embed, then registers after CLS."""
    src = randomised(num_register_tokens=2)
    sd = official_state_dict(src)
    cls_pos = torch.randn(1, 1, 16)
    sd["pos_embed"][:, :1] = cls_pos  # a real checkpoint has a non-zero CLS position
    cls_file = sd["cls_token"].clone()
    path = tmp_path / "hand.pth"
    torch.save(sd, path)
    dst = fresh(num_register_tokens=2)
    report = load_released_weights(dst, path)
    assert torch.equal(dst.vit.cls_token, cls_file + cls_pos)
    # independent reference for the token sequence, written the official way
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        patches = torch.nn.functional.conv2d(
            x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4
        )
        patches = patches.flatten(2).transpose(1, 2)
        ref = torch.cat([sd["cls_token"].expand(2, -1, -1), patches], 1) + sd["pos_embed"]
        ref = torch.cat([ref[:, :1], sd["register_tokens"].expand(2, -1, -1), ref[:, 1:]], 1)
        torch.testing.assert_close(dst._tokens(x, None), ref, rtol=0, atol=1e-6)
        for blk_i in range(2):
            ref = dst.vit.blocks[blk_i](ref)
        ref = dst.vit.norm(ref)
    torch.testing.assert_close(dst(x), ref[:, 0], rtol=0, atol=1e-6)
    assert any("CLS position" in n for n in report.notes)


def released_forward(sd: dict, blocks, norm, x: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """The released DinoVisionTransformer.forward_features (x_norm of every token), written from
    the official code: patch conv, cat(CLS), + interpolate_pos_encoding (bicubic with scale
    factor (grid + 0.1) / M, no antialias), registers inserted after CLS, blocks, norm."""
    b, _, h, w = x.shape
    tokens = torch.nn.functional.conv2d(
        x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch
    )
    tokens = torch.cat([sd["cls_token"].expand(b, -1, -1), tokens.flatten(2).transpose(1, 2)], 1)
    pos = sd["pos_embed"]
    n = pos.shape[1] - 1
    if tokens.shape[1] - 1 != n or h != w:
        m, dim = int(n**0.5), pos.shape[-1]
        h0, w0 = h // patch + 0.1, w // patch + 0.1
        grid = torch.nn.functional.interpolate(
            pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
            scale_factor=(h0 / m, w0 / m),
            mode="bicubic",
        )
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    tokens = tokens + pos
    if "register_tokens" in sd:
        regs = sd["register_tokens"].expand(b, -1, -1)
        tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], 1)
    for blk in blocks:
        tokens = blk(tokens)
    return norm(tokens)


@pytest.mark.parametrize("n_reg", [0, 4])
def test_official_file_resized_like_the_released_model(tmp_path, n_reg: int) -> None:
    """An 8x8-grid release loaded at a 4x4 grid: the forward equals the released model's own
    forward on a 16 px input (which resizes its position embeddings at run time)."""
    src = randomised(img_size=32, num_register_tokens=n_reg)
    sd = official_state_dict(src)
    sd["pos_embed"][:, :1] = torch.randn(1, 1, 16)  # a real release has a non-zero CLS position
    path = tmp_path / "release.pth"
    torch.save(sd, path)
    dst = fresh(img_size=16, num_register_tokens=n_reg)
    report = load_released_weights(dst, path)
    assert report.ok and report.pos_embed_resized == ((8, 8), (4, 4))
    assert any("interpolate_pos_encoding" in n for n in report.notes)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = released_forward(sd, src.vit.blocks, src.vit.norm, x)
        out = dst.forward_features(x)
        # timm's antialiased resize is another function: the check above can tell them apart
        timm_pe = resample_abs_pos_embed(sd["pos_embed"][:, 1:], [4, 4], [8, 8], 0)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["x_norm_regtokens"], ref[:, 1 : 1 + n_reg], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1 + n_reg :], rtol=0, atol=1e-5)
    assert (timm_pe - dst.vit.pos_embed.detach()).abs().max() > 0.05
    # at the native size the released forward uses pos_embed unchanged: a round trip is exact
    native = fresh(img_size=32, num_register_tokens=n_reg)
    load_released_weights(native, path)
    x32 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref32 = released_forward(sd, src.vit.blocks, src.vit.norm, x32)
        torch.testing.assert_close(native.forward_features(x32)["x_norm_clstoken"], ref32[:, 0],
                                   rtol=0, atol=1e-5)  # fmt: skip
    save_official_layout(native, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again.keys() == sd.keys()
    for k in ("blocks.1.mlp.fc2.weight", "patch_embed.proj.weight", "mask_token"):
        assert torch.equal(again[k], sd[k])
    # the CLS position is folded into cls_token, so the file's (CLS token + CLS position) holds
    torch.testing.assert_close(again["cls_token"] + again["pos_embed"][:, :1],
                               sd["cls_token"] + sd["pos_embed"][:, :1], rtol=0, atol=0)  # fmt: skip


def test_timm_file_resized_from_16x16_to_4x4(tmp_path) -> None:
    """timm files are resized with timm's resample, as those models do at run time."""
    # a backbone computing as timm's VisionTransformer does (its resample at run time)
    src = randomised(img_size=64, interpolate_offset=0.0, interpolate_antialias=True)  # 16x16
    path = tmp_path / "big_grid_timm.pth"
    torch.save(src.vit.state_dict(), path)
    dst = fresh(img_size=16)  # 4x4 grid
    report = load_released_weights(dst, path)
    assert report.source_format == "timm"
    assert report.pos_embed_resized == ((16, 16), (4, 4))
    expect = resample_abs_pos_embed(
        src.vit.pos_embed.detach(), new_size=[4, 4], old_size=[16, 16], num_prefix_tokens=0
    )
    assert dst.vit.pos_embed.shape == (1, 16, 16)
    torch.testing.assert_close(dst.vit.pos_embed.detach(), expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(dst.vit.blocks[1].mlp.fc2.weight, src.vit.blocks[1].mlp.fc2.weight)
    # the resampled grid is what the source model itself uses on a 16 px input
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(
        outputs(dst, x)["x_norm_clstoken"], outputs(src, x)["x_norm_clstoken"], rtol=0, atol=1e-5
    )


def test_allow_missing_registers_for_a_release_without_them(tmp_path) -> None:
    src = randomised(num_register_tokens=0)
    path = tmp_path / "no_registers.pth"
    save_official_layout(src, path)
    dst = fresh(num_register_tokens=2)
    reg_init = dst.vit.reg_token.detach().clone()
    with pytest.raises(ValueError, match=r"missing in file: vit\.reg_token"):
        load_released_weights(dst, path)
    with pytest.raises(ValueError, match=r"missing in file: vit\.reg_token"):
        load_released_weights(dst, path, allow_missing=["blocks.*"])  # does not match
    report = load_released_weights(dst, path, allow_missing=["reg_token"])
    assert report.ok and report.missing == [] and report.allowed_missing == ["vit.reg_token"]
    assert torch.equal(dst.vit.reg_token, reg_init)  # kept as initialised
    assert torch.equal(dst.vit.blocks[0].attn.qkv.weight, src.vit.blocks[0].attn.qkv.weight)
    assert "allowed missing, kept as initialised: vit.reg_token" in report.summary()
    # the prefixed name and a wildcard work too
    assert load_released_weights(
        fresh(num_register_tokens=2), path, allow_missing=["vit.reg_*"]
    ).allowed_missing == ["vit.reg_token"]


def test_summary_and_missing_file(tmp_path) -> None:
    src = randomised(img_size=32)
    path = tmp_path / "r.pth"
    save_official_layout(src, path)
    report = load_released_weights(fresh(), path)
    lines = report.summary().splitlines()
    n_tensors = len(fresh().state_dict())
    assert lines[0] == f"official layout: {n_tensors} backbone tensors loaded"
    assert lines[1] == "patch position embeddings resized 8x8 -> 4x4"
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_released_weights(fresh(), tmp_path / "dinov2_vits14_pretrain.pth")


def test_wrong_key_reported_by_name(tmp_path) -> None:
    sd = official_state_dict(randomised())
    sd["blocks.0.norm_1.weight"] = sd.pop("blocks.0.norm1.weight")
    sd["norm.weight"] = torch.zeros(8)  # wrong shape
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    dst = fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_released_weights(dst, path)
    msg = str(err.value)
    assert "blocks.0.norm_1.weight" in msg and "vit.blocks.0.norm1.weight" in msg
    assert "norm.weight file [8] vs backbone [16]" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing loaded
    report = load_released_weights(dst, path, strict_report=False)
    assert report.missing == ["vit.blocks.0.norm1.weight"]
    assert report.unexpected == ["blocks.0.norm_1.weight"]
    assert report.mismatched == [("norm.weight", (8,), (16,))]
    assert torch.equal(
        dst.vit.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"]
    )  # the rest was loaded
    assert torch.equal(dst.vit.blocks[0].norm1.weight, before["vit.blocks.0.norm1.weight"])


def test_timm_and_dinoflow_files_and_wrapped_checkpoints(tmp_path) -> None:
    src = randomised(num_register_tokens=2)
    # timm state dict (no_embed_class: pos_embed without prefix rows, no mask token)
    timm_path = tmp_path / "timm.pth"
    torch.save(src.vit.state_dict(), timm_path)
    dst = fresh(num_register_tokens=2)
    report = load_released_weights(dst, timm_path)
    assert report.source_format == "timm" and report.ok
    assert any("mask_token" in n for n in report.notes)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(
        outputs(dst, x)["x_norm_clstoken"], outputs(src, x)["x_norm_clstoken"], rtol=0, atol=1e-6
    )
    # dinoflow backbone file
    df_path = tmp_path / "backbone.pt"
    save_backbone(src, df_path)
    dst2 = fresh(num_register_tokens=2)
    assert load_released_weights(dst2, df_path).source_format == "dinoflow"
    assert_same_outputs(src, dst2)
    # a dinov2 training checkpoint: {"teacher": {"backbone.*", "dino_head.*"}}
    wrapped = {f"backbone.{k}": v for k, v in official_state_dict(src, 2).items()}
    wrapped["dino_head.mlp.0.weight"] = torch.zeros(3, 3)
    wr_path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": wrapped, "iteration": 5}, wr_path)
    dst3 = fresh(num_register_tokens=2)
    assert load_released_weights(dst3, wr_path).ok
    assert_same_outputs(src, dst3)


def test_rgb_weights_into_grayscale_backbone(tmp_path) -> None:
    src = randomised()
    path = tmp_path / "rgb.pth"
    save_official_layout(src, path)
    dst = fresh(in_chans=1)
    report = load_released_weights(dst, path)
    w = src.vit.patch_embed.proj.weight
    torch.testing.assert_close(dst.vit.patch_embed.proj.weight, w.sum(1, keepdim=True))
    assert any("summed" in n for n in report.notes)
    # a gray image through the 1-channel model == the same image repeated on 3 channels
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(
        outputs(dst, x)["x_norm_clstoken"],
        outputs(src, x.expand(-1, 3, -1, -1))["x_norm_clstoken"],
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True)])
def test_dinoflow_file_resized_with_its_own_interpolation(tmp_path, offset, antialias) -> None:
    """A dinoflow file on an 8x8 grid loaded at 4x4 is resized with the interpolation recorded
    in the file, so the loaded backbone computes what the saved one computes at 16 px."""
    src = randomised(img_size=32, interpolate_offset=offset, interpolate_antialias=antialias)
    path = tmp_path / "backbone.pt"
    save_backbone(src, path)
    dst = fresh(img_size=16)  # the default interpolation: the file's setting must win
    report = load_released_weights(dst, path)
    assert report.pos_embed_resized == ((8, 8), (4, 4))
    assert any(f"interpolate_offset {offset:g}" in n for n in report.notes)
    x = torch.randn(2, 3, 16, 16)
    for k in ("x_norm_clstoken", "x_norm_patchtokens"):
        torch.testing.assert_close(outputs(dst, x)[k], outputs(src, x)[k], rtol=0, atol=1e-5)


def test_register_release_with_other_interpolation_is_noted(tmp_path) -> None:
    src = randomised(num_register_tokens=4)
    path = tmp_path / "reg.pth"
    save_official_layout(src, path)
    report = load_released_weights(fresh(num_register_tokens=4), path)
    assert any("interpolate_offset 0.0" in n for n in report.notes)
    hub_like = fresh(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    assert not any("register release" in n for n in load_released_weights(hub_like, path).notes)
