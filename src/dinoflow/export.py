"""Export a registered backbone to other runtimes: ONNX (onnxruntime) and a plain timm ViT.

The dinoflow backbone *is* a timm ``VisionTransformer`` (``DinoVisionTransformer.vit``) whose
blocks are ``DinoBlock`` (timm's ``Block`` with the same parameters, doing less work in
training), plus a ``mask_token`` that only pretraining uses. So:

- timm: the state dict is the ``vit.*`` entries without the prefix, and ``timm.create_model``
  with the architecture's kwargs (``timm_create_model_kwargs``) rebuilds the same network; no
  download (``pretrained=False``), then ``load_state_dict``.
- ONNX: ``torch.onnx.export`` with the dynamo exporter (torch >= 2.9's default, ``dynamo=True``)
  of the backbone in eval mode, inputs preprocessed images ``images`` float32 (B, C, S, S) with a
  dynamic batch and S = the training crop size; outputs ``cls`` (B, D) and ``patch_tokens``
  (B, N, D), both after the final norm, as ``forward`` / ``forward_patches`` give them.

Preprocessing is not in either export: decode, match channels, resize the shorter side to N
(bilinear, antialiased), centre crop S, scale by 1/255 and normalise with the recorded mean/std
as ``RegisteredBackbone.preprocess`` does; the export summary (``export.json``) records each
step with its numbers (``preprocessing_spec``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dinoflow.config import Strict
from dinoflow.data.transforms import DEFAULT_CROP_RATIO, resized_shorter_side
from dinoflow.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "ExportConfig",
    "export_backbone",
    "export_onnx",
    "onnx_max_abs_diff",
    "preprocessing_spec",
    "timm_create_model_kwargs",
    "timm_model",
    "timm_state_dict",
]

ONNX_FILE = "backbone.onnx"
TIMM_WEIGHTS_FILE = "timm_backbone.safetensors"
TIMM_KWARGS_FILE = "timm_create_model.json"
SUMMARY_FILE = "export.json"


class ExportConfig(Strict):
    """``params:export`` (conf/base/parameters_export.yml)."""

    model: str = "models:/dinoflow-backbone@champion"  # a models:/ or runs:/ URI
    out_dir: str = "data/06_models/export"
    onnx: bool = True
    opset: int = Field(18, ge=17)  # the dynamo exporter's own opset is 18
    timm: bool = True
    check_batch_sizes: list[int] = Field(default_factory=lambda: [1, 3], min_length=1)
    device: str = "auto"  # the model's side of the export and its checks (the training device)
    seed: int = 0  # the random check inputs
    log_to_mlflow: bool = True


class _Tokens(nn.Module):
    """backbone -> (cls (B, D), patch_tokens (B, N, D)): the two outputs the ONNX graph has."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.forward_features(images)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def _dino_vit(model: nn.Module) -> nn.Module:
    """The DinoVisionTransformer inside a RegisteredBackbone (or the module itself)."""
    from dinoflow.models.vit import DinoVisionTransformer

    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, DinoVisionTransformer):
        raise TypeError(f"export: expected a dinoflow backbone, got {type(backbone).__name__}")
    return backbone


def timm_create_model_kwargs(model: nn.Module) -> dict[str, Any]:
    """The ``timm.create_model(**kwargs)`` arguments that build this backbone's architecture.

    ``model_name`` is a registered timm DINOv2 ViT (its own sizes are all overridden); GELU-MLP
    backbones use ``vit_small_patch14_dinov2``, SwiGLU ones ``vit_giant_patch14_dinov2`` (timm's
    packed SwiGLU, hidden width given through ``mlp_ratio``). ``pretrained=False``: nothing is
    downloaded; load the exported state dict afterwards. At the exported image size the two
    compute the same numbers; at other sizes timm resamples position embeddings with antialias
    and no offset, which equals dinoflow only for backbones built with interpolate_offset 0 and
    interpolate_antialias (dinov2's default, offset 0.1, differs there by about 1e-3).
    """
    kw = _dino_vit(model).backbone_kwargs()
    if abs(float(kw["layer_norm_eps"]) - 1e-6) > 1e-12:
        raise ValueError(
            f"export.timm: layer_norm_eps {kw['layer_norm_eps']} is not timm's ViT default 1e-6; "
            "timm.create_model cannot take another LayerNorm epsilon as a plain argument"
        )
    mlp_ratio = float(kw["mlp_ratio"])
    name = "vit_small_patch14_dinov2"
    if kw["ffn"] == "swiglu":
        # our SwiGLUFFN packs 2 x hidden outputs in fc1; timm sizes fc1 as int(dim * mlp_ratio)
        hidden = (int(kw["embed_dim"] * mlp_ratio * 2 / 3) + 7) // 8 * 8
        mlp_ratio = (2 * hidden + 0.25) / kw["embed_dim"]  # int(dim * ratio) == 2 * hidden exactly
        name = "vit_giant_patch14_dinov2"
    return {
        "model_name": name,
        "pretrained": False,
        "img_size": int(kw["img_size"]),
        "patch_size": int(kw["patch_size"]),
        "in_chans": int(kw["in_chans"]),
        "embed_dim": int(kw["embed_dim"]),
        "depth": int(kw["depth"]),
        "num_heads": int(kw["num_heads"]),
        "mlp_ratio": mlp_ratio,
        "qkv_bias": bool(kw["qkv_bias"]),
        # 0: no LayerScale (timm drops None-valued kwargs: the preset's 1e-5 would come back)
        "init_values": float(kw["layerscale_init"] or 0.0),
        "class_token": True,
        "no_embed_class": True,
        "reg_tokens": int(kw["num_register_tokens"]),
        "num_classes": 0,
        "global_pool": "token",
        "dynamic_img_size": True,
    }


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's timm ``VisionTransformer`` weights (``vit.`` prefix removed; no mask_token)."""
    sd = _dino_vit(model).vit.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def timm_model(
    kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor] | str | Path
) -> nn.Module:
    """``timm.create_model(**kwargs)`` with the exported weights loaded (strict), in eval mode.

    Its ``forward(x)`` is the CLS token after the final norm (B, D), as dinoflow's ``forward``.
    """
    import timm

    if not isinstance(state_dict, dict):
        from safetensors.torch import load_file

        state_dict = load_file(str(state_dict))
    net = timm.create_model(**kwargs)
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


def export_onnx(model: nn.Module, path: str | Path, image_size: int, opset: int = 18) -> Path:
    """Write the backbone as ONNX: ``images`` (B, C, S, S) -> ``cls`` (B, D), ``patch_tokens``.

    The batch is dynamic; S = ``image_size`` is fixed (position embeddings are resampled to the
    input grid by a bicubic interpolation that the exported graph does not carry).
    """
    backbone = _dino_vit(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Tokens(backbone).eval()
    device = next(backbone.parameters()).device  # traced where the model is (export.device)
    example = torch.zeros(2, backbone.in_chans, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=["images"],
            output_names=["cls", "patch_tokens"],
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    tmp = path.with_name(f".{path.name}.tmp")
    program.save(str(tmp))
    tmp.replace(path)
    return path


def onnx_max_abs_diff(
    path: str | Path, model: nn.Module, image_size: int, batch_sizes: Sequence[int], seed: int = 0
) -> dict[str, float]:
    """Run the ONNX file with onnxruntime and PyTorch on the same random inputs.

    Returns {"cls_b<B>": max |onnx - torch|, "patch_tokens_b<B>": ...} per batch size.
    """
    import onnxruntime as ort

    backbone = _dino_vit(model).eval()
    device = next(backbone.parameters()).device  # the PyTorch reference on export.device
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    diffs: dict[str, float] = {}
    for b in batch_sizes:
        x = torch.randn(b, backbone.in_chans, image_size, image_size, generator=gen)
        cls, patches = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref_cls, ref_patches = (t.cpu() for t in _Tokens(backbone)(x.to(device)))
        diffs[f"cls_b{b}"] = float(np.abs(cls - ref_cls.numpy()).max())
        diffs[f"patch_tokens_b{b}"] = float(np.abs(patches - ref_patches.numpy()).max())
    return diffs


def _timm_max_abs_diff(net: nn.Module, model: nn.Module, image_size: int, seed: int) -> float:
    backbone = _dino_vit(model).eval()
    x = torch.randn(
        3, backbone.in_chans, image_size, image_size, generator=torch.Generator().manual_seed(seed)
    )
    device = next(backbone.parameters()).device
    with torch.no_grad():
        return float((net(x) - backbone(x.to(device)).cpu()).abs().max())


def preprocessing_spec(model: nn.Module) -> dict[str, Any]:
    """What ``RegisteredBackbone.preprocess`` does, step by step with its numbers, for a user of
    the ONNX or timm export (``dinoflow.data.transforms.resize_center_crop`` and ``normalize``)."""
    size = int(getattr(model, "image_size", _dino_vit(model).img_size))
    ratio = float(getattr(model, "crop_ratio", DEFAULT_CROP_RATIO))
    channels = int(_dino_vit(model).in_chans)
    mean, std = list(getattr(model, "mean", [])), list(getattr(model, "std", []))
    shorter = resized_shorter_side(size, ratio)
    luma = "L = (19595 R + 38470 G + 7471 B + 32768) >> 16, as Pillow's convert('L')"
    steps = [
        {"op": "channels", "channels": channels, "rule": f"grey repeated to RGB; RGB to {luma}"},
        {
            "op": "resize_shorter_side",
            "size": shorter,
            "longer_side": f"int({shorter} * longer / shorter)",
            "interpolation": "bilinear",
            "antialias": True,
            "skip_if_shorter_side_is": size,  # then only the centre crop
        },
        {
            "op": "center_crop",
            "size": [size, size],
            "offset": "top = round((H - S) / 2), left = round((W - S) / 2), half to even",
        },
        {"op": "scale", "factor": 1 / 255, "dtype": "float32"},
        {"op": "normalize", "mean": mean, "std": std, "formula": "(x - mean) / std"},
    ]
    return {
        "image_size": size,
        "crop_ratio": ratio,
        "in_chans": channels,
        "mean": mean,
        "std": std,
        "steps": steps,
        "text": getattr(model, "preprocessing", ""),
    }


def export_backbone(model: nn.Module, cfg: ExportConfig, source: str = "") -> dict[str, Any]:
    """Write the ONNX file and/or the timm weights + kwargs under ``cfg.out_dir``; check both.

    ``model``: a RegisteredBackbone (mean, std, image_size, in_chans are recorded). Returns the
    summary written to ``export.json``: files, preprocessing, timm kwargs and the measured max
    abs differences to PyTorch (ONNX at each ``check_batch_sizes``, timm on a batch of 3).
    """
    from safetensors.torch import save

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_size = int(getattr(model, "image_size", _dino_vit(model).img_size))
    summary: dict[str, Any] = {
        "source": source,
        "preprocessing": preprocessing_spec(model),
        "files": {},
        "max_abs_diff": {},
    }
    if cfg.onnx:
        path = export_onnx(model, out / ONNX_FILE, image_size, cfg.opset)
        diffs = onnx_max_abs_diff(path, model, image_size, cfg.check_batch_sizes, cfg.seed)
        summary["files"]["onnx"] = str(path)
        summary["max_abs_diff"].update({f"onnx/{k}": v for k, v in diffs.items()})
        summary["onnx"] = {
            "inputs": {
                "images": ["batch", summary["preprocessing"]["in_chans"], image_size, image_size]
            },
            "outputs": ["cls", "patch_tokens"],
            "opset": cfg.opset,
        }
        log.info("ONNX export %s: max |onnx - torch| %s", path, diffs)
    if cfg.timm:
        kwargs = timm_create_model_kwargs(model)
        weights = timm_state_dict(model)
        atomic_write_bytes(out / TIMM_WEIGHTS_FILE, save(weights))
        atomic_write_json(out / TIMM_KWARGS_FILE, kwargs)
        diff = _timm_max_abs_diff(timm_model(kwargs, weights), model, image_size, cfg.seed)
        summary["files"]["timm_state_dict"] = str(out / TIMM_WEIGHTS_FILE)
        summary["files"]["timm_kwargs"] = str(out / TIMM_KWARGS_FILE)
        summary["timm_create_model"] = kwargs
        summary["max_abs_diff"]["timm/cls"] = diff
        log.info("timm export %s: max |timm - dinoflow| CLS %.3g", out / TIMM_WEIGHTS_FILE, diff)
    atomic_write_json(out / SUMMARY_FILE, summary)
    summary["files"]["summary"] = str(out / SUMMARY_FILE)
    return summary
