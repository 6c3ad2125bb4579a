"""Continued pretraining from a released (official-layout) backbone through ``training.pretrain``.

The frozen-backbone head warm-up must leave the student AND teacher backbones bit-identical to
the loaded weights while the heads train; once it ends the backbone moves. The loaded
backbone's kNN is logged at step 0, before any training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.evaluation.knn import backbone_knn
from dinoflow.models.vit import load_backbone
from dinoflow.training import backbone_from_config, build_student, pretrain
from dinoflow.weights import load_released_weights, save_official_layout

MEAN, STD = [0.5], [0.25]


def build_backbone(cfg: PretrainConfig, in_chans: int):
    return backbone_from_config(cfg.backbone, cfg.crops.global_size, in_chans)


def tiny_cfg(
    run_dir: Path, weights: Path | None, warmup: int, steps: int, **init
) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "crops": {"global_size": 16, "local_size": 8, "n_local": 1},
        "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 2,
                     "num_heads": 2, "num_register_tokens": 2, "drop_path_rate": 0.1},
        "head": {"n_prototypes": 32, "hidden_dim": 32, "bottleneck_dim": 16},
        "optim": {"base_lr": 0.01, "lr_scaling": "none", "warmup_epochs": 0,
                  "freeze_last_layer_epochs": 0, "teacher_temp_warmup_epochs": 0,
                  "teacher_temp_start": 0.07, "momentum_teacher_start": 0.99},
        "train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": 4, "device": "cpu",
                  "num_workers": 0, "run_dir": str(run_dir), "checkpoint_every_steps": 1,
                  "log_every_steps": 1, "knn_every_epochs": 1, "progress": False, "seed": 3},
        "monitor": {"check_after_steps": 1000},
        "init": {"weights": None if weights is None else str(weights),
                 "head_warmup_steps": warmup, **init},
    })  # fmt: skip


def split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(ids=[f"x/{i}" for i in range(n)], labels=rng.integers(0, 3, n),
                 class_names=["a", "b", "c"], channels=1,
                 images=rng.integers(0, 256, (n, 16, 16), dtype=np.uint8))  # fmt: skip


def released_file(cfg: PretrainConfig, path: Path, n_reg: int = 2) -> dict[str, torch.Tensor]:
    """An official-layout file with random, non-trivial weights; returns the backbone state."""
    torch.manual_seed(123)
    src = build_backbone(cfg, in_chans=1)
    if n_reg != cfg.backbone.num_register_tokens:
        src = build_backbone(
            cfg.model_copy(update={"backbone": cfg.backbone.model_copy(
                update={"num_register_tokens": n_reg})}), in_chans=1)  # fmt: skip
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    save_official_layout(src, path)
    return {k: v.clone() for k, v in src.state_dict().items()}


def backbone_state(
    sd: dict[str, torch.Tensor], prefix: str = "backbone."
) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def heads_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("backbone.")}


def test_frozen_head_warmup_then_backbone_moves(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    weights = tmp_path / "dinov2_tiny_reg2_pretrain.pth"
    cfg = tiny_cfg(run_dir, weights, warmup=3, steps=5)
    loaded = released_file(cfg, weights)
    train, bank, queries = split(40, 0), split(24, 1), split(12, 2)

    # the heads pretrain() builds: same seed, same construction order as in pretrain()
    torch.manual_seed(cfg.train.seed)
    fresh = build_student(cfg, 1)
    fresh_heads = heads_state(fresh.state_dict())
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}

    with pytest.raises(SystemExit, match="stopped after step 3"):
        pretrain(cfg, train, MEAN, STD, bank, queries, stop_after_steps=3)
    ckpt_path = max((run_dir / "checkpoints").rglob("step_*.pt"))  # the newest of the last 2
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] == 3  # every step so far was a warm-up step (0, 1, 2)
    for name in ("student", "teacher"):
        bb = backbone_state(ckpt[name])
        assert bb.keys() == loaded.keys()
        for k, v in loaded.items():
            assert torch.equal(bb[k], v), f"{name} backbone {k} moved during the warm-up"
    # the heads trained meanwhile: every trainable student head tensor moved (the weight-norm
    # gain is fixed at 1 as in DINOv2), and the teacher's heads followed by EMA
    student_heads, teacher_heads = heads_state(ckpt["student"]), heads_state(ckpt["teacher"])
    assert student_heads.keys() == fresh_heads.keys()
    for k, v in fresh_heads.items():
        changed = not torch.equal(student_heads[k], v)
        assert changed == (k in trainable), f"student head {k}: changed={changed}"
    assert not torch.equal(
        teacher_heads["dino_head.mlp.0.weight"], fresh_heads["dino_head.mlp.0.weight"]
    )

    # step 0 of the history is the loaded backbone's kNN, before any step
    knn0 = [h for h in ckpt["history"] if "knn/top1_k20" in h]
    assert knn0[0]["step"] == 0
    ref = build_backbone(cfg, in_chans=1)
    assert load_released_weights(ref, weights).ok
    expect = backbone_knn(ref, bank, queries, MEAN, STD, 16)["top1_k20"]
    assert knn0[0]["knn/top1_k20"] == expect

    # resume: steps 3 and 4 are past the warm-up, so the backbone now trains
    result = pretrain(cfg, train, MEAN, STD, bank, queries)
    assert result.resumed_from_step == 3 and result.steps == 5
    assert [h["step"] for h in result.knn_history] == [0, 5]
    final = load_backbone(result.teacher_backbone).state_dict()
    moved = [k for k, v in loaded.items() if not torch.equal(final[k], v)]
    # every trainable tensor that gets a gradient moved (the mask token only does when masked)
    assert {"vit.blocks.0.attn.qkv.weight", "vit.blocks.1.mlp.fc2.weight", "vit.norm.weight",
            "vit.cls_token", "vit.pos_embed", "vit.reg_token"} <= set(moved)  # fmt: skip


def test_tiny_backbone_lr_during_warmup_moves_only_slightly(tmp_path: Path) -> None:
    """head_warmup_backbone_lr_mult > 0: the backbone moves during the warm-up, but far less
    than with the full lr (same data, same seed, 2 steps)."""
    train = split(16, 0)
    drift = {}
    for mult in (1e-3, 1.0):
        weights = tmp_path / "w.pth"
        cfg = tiny_cfg(
            tmp_path / f"run{mult}", weights, warmup=5, steps=2, head_warmup_backbone_lr_mult=mult
        )
        loaded = released_file(cfg, weights)
        result = pretrain(cfg, train, MEAN, STD)
        w = load_backbone(result.teacher_backbone).state_dict()["vit.blocks.0.attn.qkv.weight"]
        drift[mult] = float((w - loaded["vit.blocks.0.attn.qkv.weight"]).abs().max())
    assert 0 < drift[1e-3] < drift[1.0] / 50


def test_file_that_does_not_fit_is_named_and_allow_missing_is_honoured(tmp_path: Path) -> None:
    train = split(8, 0)
    weights = tmp_path / "dinov2_no_registers.pth"
    cfg = tiny_cfg(tmp_path / "run", weights, warmup=1, steps=1)
    released_file(cfg, weights, n_reg=0)  # a release without registers, config with 2
    with pytest.raises(ValueError, match=r"missing in file: vit\.reg_token"):
        pretrain(cfg, train, MEAN, STD)
    assert not (tmp_path / "run").exists()  # failed before any work
    cfg.init.allow_missing = ["reg_token"]  # registers start fresh: allowed explicitly
    result = pretrain(cfg, train, MEAN, STD)
    assert result.steps == 1
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        pretrain(
            tiny_cfg(tmp_path / "run2", tmp_path / "absent.pth", warmup=1, steps=1),
            train,
            MEAN,
            STD,
        )


def test_gpu_continue_profile_takes_a_vits14_reg4_release(tmp_path: Path) -> None:
    """conf/gpu_continue is self-contained, valid, and fits dinov2_vits14_reg4_pretrain.pth
    (a 37x37 position grid for 518 px, kept: pos_embed_size 518, interpolated at run time with
    the register releases' setting)."""
    import yaml

    conf = Path(__file__).resolve().parents[3] / "conf" / "gpu_continue"
    params = yaml.safe_load((conf / "parameters_pretrain.yml").read_text())["pretrain"]
    cfg = PretrainConfig.model_validate(params)
    assert set(params) == set(PretrainConfig.model_fields)  # every group set explicitly
    assert cfg.init.weights and cfg.init.head_warmup_steps == 1250
    assert cfg.init.head_warmup_backbone_lr_mult == 0.0
    assert cfg.optim.teacher_temp_start == cfg.optim.teacher_temp_end == 0.07
    assert cfg.optim.momentum_teacher_start == 0.999
    data = yaml.safe_load((conf / "parameters_data.yml").read_text())["data"]
    assert data["source"] == "image_folder" and data["path"] is None

    # the release's tensor shapes (values do not matter here): ViT-S/14, 4 registers, 518 px
    backbone = build_backbone(cfg, in_chans=3)
    release = {
        k.removeprefix("vit."): torch.zeros(v.shape) for k, v in backbone.state_dict().items()
    }
    release["pos_embed"] = torch.zeros(1, 1 + 37 * 37, 384)
    release["register_tokens"] = release.pop("reg_token")
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(release, path)
    report = load_released_weights(backbone, path)
    assert report.ok and report.source_format == "official"
    assert report.pos_embed_resized is None  # the 37x37 grid is kept
    assert backbone.vit.pos_embed.shape == (1, 37 * 37, 384)
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.0, True)
    # at the global crop (224 px) the backbone interpolates to 16x16 at run time
    assert backbone.forward_features(torch.zeros(1, 3, 224, 224))["x_norm_patchtokens"].shape == (1, 256, 384)
