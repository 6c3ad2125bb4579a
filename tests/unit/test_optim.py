"""Parameter groups, schedule application, per-module clipping and EMA (docs/method.md section 5)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dinoflow.models.heads import DINOHead
from dinoflow.optim import (
    apply_schedules,
    build_optimizer,
    clip_gradients,
    ema_update,
    param_groups,
)


class TinyBackbone(nn.Module):
    """Same layout as dinoflow.models.vit.DinoVisionTransformer: ``.vit`` and ``.mask_token``."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            img_size=28,
            patch_size=7,
            embed_dim=16,
            depth=2,
            num_heads=2,
            init_values=1e-5,
            dynamic_img_size=True,
            no_embed_class=True,
            reg_tokens=2,
            num_classes=0,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 16))


def TinyHead(norm_last_layer: bool = False) -> DINOHead:  # noqa: N802 (reads as a class)
    """mlp (16 -> 8) and the weight-normalised last_layer (8 -> 10)."""
    return DINOHead(16, 10, hidden_dim=8, bottleneck_dim=8, nlayers=1,
                    norm_last_layer=norm_last_layer)


def per_param(groups: list[dict], key: str) -> dict[str, float]:
    return {n: g[key] for g in groups for n in g["param_names"]}


def expected_lr_multiplier(name: str) -> float:
    if name.startswith("vit.blocks.0."):
        return 0.9**2
    if name.startswith("vit.blocks.1."):
        return 0.9
    if name.startswith("vit.patch_embed."):
        return 0.9**3 * 0.2
    if name in ("vit.cls_token", "vit.pos_embed", "vit.reg_token", "mask_token"):
        return 0.9**3
    assert name.startswith(("vit.norm.", "dino_head.")), name
    return 1.0


G = "dino_head.last_layer.parametrizations.weight.original0"  # the reference's weight_g
V = "dino_head.last_layer.parametrizations.weight.original1"  # weight_v


@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_param_groups_layer_decay_weight_decay_and_last_layer(norm_last_layer: bool) -> None:
    backbone, head = TinyBackbone(), TinyHead(norm_last_layer)
    groups = param_groups(backbone, {"dino_head": head}, layer_decay=0.9, patch_embed_lr_mult=0.2)
    lr, wd, last = (
        per_param(groups, k) for k in ("lr_multiplier", "wd_multiplier", "is_last_layer")
    )
    trainable = [n for n, p in backbone.named_parameters()] + [
        f"dino_head.{n}" for n, p in head.named_parameters() if p.requires_grad
    ]
    assert sorted(lr) == sorted(trainable)  # every trainable parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert (G in lr) == (not norm_last_layer)  # DINOv2 trains g, DINOv1 keeps it at 1
    for name in trainable:
        assert lr[name] == pytest.approx(expected_lr_multiplier(name)), name
    assert lr["vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.81)
    assert lr["vit.patch_embed.proj.weight"] == pytest.approx(0.1458)

    no_wd = {n for n in trainable if n.endswith(".bias") or ".norm" in n or "gamma" in n}
    assert {"vit.blocks.1.ls2.gamma", "vit.norm.weight", "vit.blocks.0.norm1.weight"} <= no_wd
    for name in trainable:
        assert wd[name] == (0.0 if name in no_wd else 1.0), name
    assert wd["mask_token"] == 1.0 and wd["vit.pos_embed"] == 1.0  # tokens are decayed
    if not norm_last_layer:
        # as the reference's get_params_groups_with_decay: "last_layer.weight_g" is neither a
        # bias nor a norm nor a gamma, so g is decayed (wd 1) at lr multiplier 1
        assert (lr[G], wd[G], last[G]) == (1.0, 1.0, True)

    assert [n for n, v in last.items() if v] == ([V] if norm_last_layer else [G, V])
    # params in one group share all settings: groups are fused by setting, and the backbone
    # never shares a group with a head (the continued-pretraining warm-up scales it alone)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], g["is_backbone"]) for g in groups]
    assert len(keys) == len(set(keys))
    for g in groups:
        assert all(n.startswith("dino_head.") != g["is_backbone"] for n in g["param_names"])


def make_optimizer() -> tuple[torch.optim.AdamW, list[dict]]:
    groups = param_groups(TinyBackbone(), {"dino_head": TinyHead()})
    return build_optimizer(groups), groups


def test_build_optimizer_adamw_foreach_on_cpu() -> None:
    opt, groups = make_optimizer()
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert len(opt.param_groups) == len(groups)


def test_apply_schedules_multipliers_and_frozen_last_layer() -> None:
    opt, _ = make_optimizer()
    apply_schedules(opt, lr=0.01, wd=0.05, freeze_last_layer=True)
    for g in opt.param_groups:
        want_lr = 0.0 if g["is_last_layer"] else 0.01 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(want_lr)
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_multiplier"])
    last = next(g for g in opt.param_groups if g["is_last_layer"])
    assert last["lr"] == 0.0
    apply_schedules(opt, lr=0.01, wd=0.05, freeze_last_layer=False)
    assert last["lr"] == pytest.approx(0.01)
    block1 = next(g for g in opt.param_groups if "vit.blocks.1.attn.qkv.weight" in g["param_names"])
    assert block1["lr"] == pytest.approx(0.009) and block1["weight_decay"] == pytest.approx(0.05)


def test_frozen_last_layer_does_not_move() -> None:
    """g and v stay during the freeze (lr 0, so no decay either), and move after it."""
    opt, groups = make_optimizer()
    last = next(g for g in groups if g["is_last_layer"])["params"]
    assert len(last) == 2  # g and v
    before = [p.detach().clone() for p in last]
    for p in (p for g in groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    apply_schedules(opt, lr=0.1, wd=0.04, freeze_last_layer=True)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(last, before, strict=True))
    apply_schedules(opt, lr=0.1, wd=0.04, freeze_last_layer=False)
    opt.step()
    assert not any(torch.equal(p, b) for p, b in zip(last, before, strict=True))


def test_clip_gradients_per_module() -> None:
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(1, 1, bias=False)
    a.weight.grad = torch.full((2, 2), 3.0)  # norm 6
    b.weight.grad = torch.full((1, 1), 1.0)  # norm 1 (joint norm sqrt(37) would clip it)
    norms = clip_gradients({"backbone": a, "head": b}, max_norm=3.0)
    assert norms == {"backbone": pytest.approx(6.0), "head": pytest.approx(1.0)}
    assert a.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert b.weight.grad.item() == 1.0
    assert clip_gradients({"empty": nn.Linear(1, 1)}) == {"empty": 0.0}


def test_ema_update_formula() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    ema_update(teacher, student, 0.992)
    for t, t_before, s in zip(teacher.parameters(), t0, s0, strict=True):
        torch.testing.assert_close(
            t.detach(), t_before * 0.992 + s * (1 - 0.992), rtol=1e-6, atol=1e-7
        )
    for s, s_before in zip(student.parameters(), s0, strict=True):
        assert torch.equal(s, s_before)  # student untouched
    ema_update(teacher, student, 1.0)  # momentum 1: frozen teacher
    t1 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), t1, strict=True))
    with pytest.raises(ValueError, match="parameters"):
        ema_update(teacher, nn.Linear(3, 2, bias=False), 0.9)
