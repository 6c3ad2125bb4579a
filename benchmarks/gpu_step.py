"""GPU pretraining step benchmark: images/s and peak memory of one DINOv2 training step.

The reference recipe of ``conf/gpu/parameters_pretrain.yml`` (ViT-S/14, K=65536, batch 64,
2x224 + 8x98 crops, bf16 autocast, fused AdamW, SDPA attention) on synthetic crops: the step
itself (teacher pass, student pass, DINO + iBOT + KoLeo, backward, clipping, AdamW, EMA), not the
data loading. Prints one JSON object.

    python -m benchmarks.gpu_step                      # the reference step on cuda:0
    python -m benchmarks.gpu_step --compile            # with torch.compile
    python -m benchmarks.gpu_step --tiny --device cpu  # a seconds-long self-check without a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

from dinoflow.config import PretrainConfig
from dinoflow.training import DINOv2, StepMasks, Trainer, wrap_for_training

ROOT = Path(__file__).resolve().parents[1]

TINY = {"crops": {"global_size": 28, "local_size": 14, "n_local": 2},
        "backbone": {"arch": "custom", "embed_dim": 48, "depth": 2, "num_heads": 2},
        "head": {"n_prototypes": 256, "hidden_dim": 64, "bottleneck_dim": 32}}


def reference_config(args: argparse.Namespace) -> PretrainConfig:
    """conf/gpu's pretrain parameters, with the command line's overrides."""
    params = yaml.safe_load((ROOT / "conf" / "gpu" / "parameters_pretrain.yml").read_text())["pretrain"]
    if args.tiny:
        for group, values in TINY.items():
            params[group].update(values)
    params["train"].update({"batch_size": args.batch_size, "compile": args.compile,
                            "device": args.device, "precision": args.precision,
                            "fused_optimizer": args.device == "cuda"})
    return PretrainConfig.model_validate(params)


def synthetic_batch(cfg: PretrainConfig, device: torch.device, seed: int = 0) -> dict:
    """Random normalised crops (2B global, N*B local) and iBOT block masks as the loader makes."""
    b, c = cfg.train.batch_size, cfg.crops
    g = torch.Generator().manual_seed(seed)
    step_masks = StepMasks(cfg, 0, 1)
    masks = step_masks.masks(step=0, global_batch=b)
    return {
        "global_crops": torch.randn(2 * b, 3, c.global_size, c.global_size, generator=g).to(device),
        "local_crops": torch.randn(c.n_local * b, 3, c.local_size, c.local_size, generator=g).to(device),
        "n_local": c.n_local, "batch_size": b, "masks": masks.to(device),
        "max_masked": step_masks.max_masked(b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (per GPU)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (kernels, compile)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script only")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (use --tiny --device cpu to check the script)")

    cfg = reference_config(args)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    total = args.warmup + args.steps
    # the run's own parts; a step past the warm-ups of a run as long as the reference epoch
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"epochs": 2, "steps_per_epoch": max(total, 1250)})})
    method = DINOv2(cfg, 3, device)
    trainer = Trainer(method, cfg, 1_000_000, 1, device)
    step0 = trainer.state.total_steps // 2
    model = wrap_for_training(method.student, method.teacher, cfg, 1, device, fsdp=False)
    student, t, k = method.student, cfg.train, cfg.head.n_prototypes
    batch = synthetic_batch(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> dict:
        trainer.train_mode(model)
        return trainer.step(model, batch, step0 + i)

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, total):
        metrics = step(i)
    sync()
    elapsed = time.perf_counter() - t0
    attn = student.backbone.vit.blocks[0].attn if hasattr(student.backbone, "vit") else None
    result = {
        "benchmark": "dinoflow pretraining step",
        "model": f"{cfg.backbone.arch}/{cfg.backbone.patch_size}" + (" (tiny)" if args.tiny else ""),
        "params_million": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        "batch_size": t.batch_size,
        "crops": f"2x{cfg.crops.global_size} + {cfg.crops.n_local}x{cfg.crops.local_size}",
        "n_prototypes": k,
        "precision": args.precision,
        "fused_adamw": bool(t.fused_optimizer),
        "sdpa_attention": bool(getattr(attn, "fused_attn", False)),
        "compile": t.compile,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "warmup_seconds": round(warmup_s, 2),
        "seconds_per_step": round(elapsed / args.steps, 4),
        "images_per_second": round(t.batch_size * args.steps / elapsed, 1),
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda" else None),
        "final_loss": round(float(metrics["loss/total"]), 4),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
