"""Parameters are validated before any work, with one message naming every bad key."""

import pytest

from dinoflow.config import ConfigError, PretrainConfig, validate


def test_unknown_and_out_of_range_keys_are_named():
    with pytest.raises(ConfigError) as err:
        validate(PretrainConfig, {"train": {"epochz": 3, "batch_size": 0}}, "pretrain")
    text = str(err.value)
    assert "pretrain.train.epochz: unknown key" in text
    assert "pretrain.train.batch_size" in text and "(got 0)" in text


def test_crop_sizes_must_fit_the_patch():
    with pytest.raises(ConfigError, match="local_size=12 is not a multiple of backbone.patch_size=14"):
        validate(PretrainConfig, {"crops": {"local_size": 12}}, "pretrain")
    with pytest.raises(ConfigError, match="pos_embed_size=500 is not a multiple of backbone.patch_size=14"):
        validate(PretrainConfig, {"backbone": {"pos_embed_size": 500}}, "pretrain")


def test_defaults_are_the_dinov2_reference():
    cfg = PretrainConfig()
    assert (cfg.crops.global_size, cfg.crops.n_local, cfg.crops.blur_p) == (224, 8, (1.0, 0.1, 0.5))
    assert (cfg.backbone.arch, cfg.backbone.patch_size, cfg.backbone.drop_path_rate) == ("vit_small", 14, 0.3)
    assert (cfg.head.n_prototypes, cfg.head.hidden_dim, cfg.head.bottleneck_dim) == (65536, 2048, 256)
    assert (cfg.loss.student_temp, cfg.loss.center_momentum, cfg.loss.koleo_weight) == (0.1, 0.9, 0.1)
    o = cfg.optim
    assert (o.base_lr, o.warmup_epochs, o.layer_decay, o.patch_embed_lr_mult, o.clip_grad) == (0.004, 10, 0.9, 0.2, 3.0)
    assert (o.momentum_teacher_start, o.teacher_temp_start, o.teacher_temp_end, o.teacher_temp_warmup_epochs) == (0.992, 0.04, 0.07, 30)
    # the official code's behaviour (docs/faithfulness.md)
    assert cfg.head.norm_last_layer is False and cfg.masking.reject_small_blocks is False
    assert (cfg.backbone.interpolate_offset, cfg.backbone.interpolate_antialias) == (0.1, False)
    assert o.schedule_convention == "dinov2" and cfg.backbone.pos_embed_size is None


