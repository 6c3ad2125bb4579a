"""Benchmark (not a test): inference speed of the distilled student against its teacher.

    python -m benchmarks.bench_distill --threads 2

The two backbones of conf/base (the teacher of ``parameters_pretrain.yml``, the student of
``parameters_distillation.yml``, freshly initialised: the speed does not depend on the weights)
embed the same batches of 28 x 28 images (CLS after the final norm, fp32, inference mode), in one
process, alternating student and teacher. Reports images/s (wall and CPU time, medians), the
FLOPs per image (``torch.utils.flop_counter``) and the speed-up.
"""

from __future__ import annotations

import argparse
import json

import torch
import yaml

from benchmarks.common import ROOT, interleaved_times, machine_info, median
from dinoflow.config import DistillationConfig, PretrainConfig
from dinoflow.methods.frozen_teacher import backbone_flops
from dinoflow.training import backbone_from_config


def _conf(name: str, section: str) -> dict:
    return yaml.safe_load((ROOT / "conf/base" / name).read_text())[section]


def backbones() -> dict[str, tuple[torch.nn.Module, int]]:
    """{"student", "teacher"}: (backbone in eval mode, global crop size), conf/base's sizes."""
    teacher_cfg = PretrainConfig.model_validate(_conf("parameters_pretrain.yml", "pretrain"))
    student_cfg = DistillationConfig.model_validate(_conf("parameters_distillation.yml", "distillation"))
    out = {}
    for name, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
        torch.manual_seed(0)
        size = cfg.crops.global_size
        out[name] = (backbone_from_config(cfg.backbone, size, 1).eval(), size)
    return out


def bench(threads: int, batch: int = 256, repeats: int = 7) -> dict:
    """Images/s of student and teacher over the same (batch, 1, S, S) inputs, interleaved."""
    torch.set_num_threads(threads)
    models = backbones()
    size = models["teacher"][1]
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(0))

    def run(model: torch.nn.Module):
        def call(_: int) -> None:
            with torch.inference_mode():
                model(x)
        return call

    times = interleaved_times({n: run(m) for n, (m, _) in models.items()}, repeats, warmup=2)
    result: dict = {"threads": threads, "batch": batch, "image_size": size, "repeats": repeats}
    for name, (model, _) in models.items():
        wall, cpu = median(times[name]["wall"]), median(times[name]["cpu"])
        result[name] = {
            "embed_dim": model.embed_dim, "depth": model.depth,
            "flops_per_image": backbone_flops(model, size),
            "images_per_s": batch / wall, "images_per_cpu_s": batch / cpu, "wall_s_median": wall,
        }  # fmt: skip
    s, t = result["student"], result["teacher"]
    result["flops_ratio"] = s["flops_per_image"] / t["flops_per_image"]
    result["speedup_wall"] = s["images_per_s"] / t["images_per_s"]
    result["speedup_cpu_time"] = s["images_per_cpu_s"] / t["images_per_cpu_s"]
    return result


def markdown(result: dict) -> str:
    s, t = result["student"], result["teacher"]
    return (f"Distillation ({result['threads']} threads, batch {result['batch']} at "
            f"{result['image_size']} px, inference): student d{s['embed_dim']} x{s['depth']} "
            f"{s['images_per_s']:.0f} images/s, teacher d{t['embed_dim']} x{t['depth']} "
            f"{t['images_per_s']:.0f} images/s: **{result['speedup_wall']:.2f}x** "
            f"(CPU time {result['speedup_cpu_time']:.2f}x) for {result['flops_ratio']:.2f} of the "
            f"teacher's FLOPs per image.")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    result = {"machine": machine_info(args.threads), **bench(args.threads, args.batch, args.repeats)}
    print(json.dumps(result, indent=1))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
