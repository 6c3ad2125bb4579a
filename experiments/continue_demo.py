"""Continued pretraining from released-format weights, on CPU: naive versus protected.

1. A small backbone pretrained by dinoflow on Fashion-MNIST (``--backbone PATH``: a dinoflow
   backbone file, e.g. data/06_models/pretrain/teacher_backbone.pt; otherwise pretrained here briefly).
2. Saved in the official DINOv2 key layout (``save_official_layout``), as a release would be:
   teacher backbone only, no heads.
3. Continued with ``train.pretrain`` (``init.weights`` = that file) on a shifted domain
   (``--shift``: inverted Fashion-MNIST, 255 - x, by default; or rotated by 90 degrees),
   three times:
   - naive: fresh heads, no head warm-up, the from-scratch recipe (its lr, momentum 0.992,
     teacher temperature warm-up 0.04 -> 0.07);
   - warm-up only: the naive run plus a head warm-up with the backbone frozen;
   - protected: backbone frozen while the fresh heads and centers settle
     (``init.head_warmup_steps``), 8x lower lr, teacher momentum 0.999 -> 1, teacher
     temperature 0.07 from the start.
4. kNN top-1 (k=20; bank: train subset, queries: test subset) on both domains before and after
   each, plus the online kNN curve on the new domain (step 0 = the loaded backbone).

Results: experiments/results/continue_demo.json and .md. Run from the repository root:

    OMP_NUM_THREADS=2 python -m experiments.continue_demo --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dinoflow.config import PretrainConfig
from dinoflow.data import Split, channel_stats, load_splits
from dinoflow.evaluation.knn import backbone_knn
from dinoflow.models.vit import DinoVisionTransformer, load_backbone
from dinoflow.training import peak_lr, pretrain
from dinoflow.weights import load_released_weights, save_official_layout

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--backbone",
        type=Path,
        default=None,
        help="a dinoflow backbone file to start from (default: pretrain one here)",
    )
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--continue-steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=100, help="protected run: frozen backbone")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bank", type=int, default=5000, help="kNN bank: train images per domain")
    p.add_argument("--queries", type=int, default=2000, help="kNN queries: test images per domain")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", choices=sorted(SHIFTS), default="invert", help="the new domain")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    return p.parse_args(argv)  # fmt: skip


def recipe(
    run_dir: Path,
    steps: int,
    batch_size: int,
    seed: int,
    img_size: int = 28,
    arch: dict[str, Any] | None = None,
) -> PretrainConfig:
    """The from-scratch recipe of conf/base at demo length (its warm-ups as fractions of the run).

    arch: the backbone of the weights being continued (default: conf/base's).
    """
    steps_per_epoch = 50  # kNN monitor cadence; schedules are fractions of the run
    params = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    params["crops"]["global_size"] = img_size
    if arch:
        params["backbone"].update(arch)
    params["optim"].update({
        "warmup_epochs": 0.1 * steps / steps_per_epoch,
        "freeze_last_layer_epochs": 0.05 * steps / steps_per_epoch,
        "teacher_temp_warmup_epochs": min(params["optim"]["teacher_temp_warmup_epochs"],
                                          0.3 * steps / steps_per_epoch),
    })  # fmt: skip
    params["train"].update({
        "epochs": steps / steps_per_epoch, "steps_per_epoch": steps_per_epoch, "time_budget_min": None,
        "batch_size": batch_size, "seed": seed, "device": "cpu", "num_workers": 0, "threads": None,
        "run_dir": str(run_dir), "checkpoint_every_steps": 10_000, "resume": False,
        "log_every_steps": 25, "knn_every_epochs": 1, "progress": False,
    })  # fmt: skip
    params["launcher"]["type"] = "local"
    params["init"]["weights"] = None
    params["monitor"]["check_after_steps"] = 10_000
    return PretrainConfig.model_validate(params)


def naive(cfg: PretrainConfig, weights: Path) -> PretrainConfig:
    """What a user gets by pointing the from-scratch recipe at released weights."""
    return cfg.model_copy(update={"init": cfg.init.model_copy(update={"weights": str(weights)})})


def warmup_only(cfg: PretrainConfig, weights: Path, warmup_steps: int) -> PretrainConfig:
    """The naive run plus the frozen-backbone head warm-up, nothing else changed."""
    init = cfg.init.model_copy(update={"weights": str(weights), "head_warmup_steps": warmup_steps,
                                       "head_warmup_backbone_lr_mult": 0.0})  # fmt: skip
    return cfg.model_copy(update={"init": init})


def protected(cfg: PretrainConfig, weights: Path, warmup_steps: int) -> PretrainConfig:
    """Head warm-up with the backbone frozen, lower lr, slow teacher, no temperature warm-up."""
    spe = cfg.train.steps_per_epoch or 1
    optim = cfg.optim.model_copy(update={
        "base_lr": cfg.optim.base_lr / 8,
        "warmup_epochs": 2 * warmup_steps / spe,  # the backbone joins on a rising lr
        "freeze_last_layer_epochs": 0.2 * warmup_steps / spe,
        "momentum_teacher_start": 0.999, "momentum_teacher_end": 1.0,
        "teacher_temp_start": 0.07, "teacher_temp_end": 0.07, "teacher_temp_warmup_epochs": 0,
        "max_warmup_fraction": 1.0,
    })  # fmt: skip
    init = cfg.init.model_copy(update={"weights": str(weights), "head_warmup_steps": warmup_steps,
                                       "head_warmup_backbone_lr_mult": 0.0})  # fmt: skip
    return cfg.model_copy(update={"optim": optim, "init": init})


SHIFTS = {"invert": "inverted", "rotate": "rotated"}


def shifted(split: Split, shift: str = "invert") -> Split:
    """The same images and labels in another domain: 255 - x, or rotated by 90 degrees."""
    assert split.images is not None
    if shift == "invert":
        images = 255 - split.images
    else:  # rotate: (N, H, W) arrays, a quarter turn
        images = np.ascontiguousarray(np.rot90(split.images, 1, axes=(1, 2)))
    return replace(split, images=images, name=f"{split.name}_{SHIFTS[shift]}")


def pick(split: Split, n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return split.subset(np.sort(rng.permutation(len(split))[: min(n, len(split))]))


def knn_top1(backbone: DinoVisionTransformer, bank: Split, queries: Split, mean, std) -> float:
    """Weighted kNN top-1 (k=20, T=0.07) of the final-norm CLS features."""
    size = int(backbone.vit.patch_embed.img_size[0])
    out = backbone_knn(backbone, bank, queries, mean, std, size, batch_size=500)
    return round(100 * float(out["top1_k20"]), 2)


def evaluate(
    backbone: DinoVisionTransformer, domains: dict[str, dict[str, Any]]
) -> dict[str, float]:
    return {name: knn_top1(backbone, d["bank"], d["queries"], d["mean"], d["std"])
            for name, d in domains.items()}  # fmt: skip


def arch_of(backbone: DinoVisionTransformer) -> dict[str, Any]:
    kw = backbone.backbone_kwargs()
    return {"arch": "custom", "patch_size": kw["patch_size"], "embed_dim": kw["embed_dim"],
            "depth": kw["depth"], "num_heads": kw["num_heads"], "mlp_ratio": kw["mlp_ratio"],
            "num_register_tokens": kw["num_register_tokens"], "ffn": kw["ffn"]}  # fmt: skip


def markdown(res: dict[str, Any]) -> str:
    before, new = res["before"], res.get("shift", "inverted")
    lines = [
        f"# Continued pretraining demo (CPU): Fashion-MNIST -> {new} Fashion-MNIST",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Start: {res['start']['what']}. kNN top-1 (%, k=20): bank {res['knn']['bank']} train "
        f"images, queries {res['knn']['queries']} test images, per domain. Continued for "
        f"{res['continue_steps']} steps (batch {res['batch_size']}) on {new} training images.",
        "",
        *(
            [
                "Online kNN while pretraining (original domain, val subset; step: top-1 %): "
                + ", ".join(f"{s}: {100 * a:.1f}" for s, a in res["start"]["online_knn"]),
                "",
            ]
            if "online_knn" in res["start"]
            else []
        ),
        f"| run | original: before | original: after | {new}: before | {new}: after "
        f"| min online kNN ({new} val) | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in res["runs"].items():
        curve = run["online_knn"]
        low = min(curve, key=lambda h: h[1])
        lines.append(
            f"| {name} | {before['original']:.2f} | {run['after']['original']:.2f} "
            f"| {before[new]:.2f} | {run['after'][new]:.2f} "
            f"| {100 * low[1]:.2f} (step {low[0]}) | {run['seconds']:.0f} |"
        )
    lines += [
        "",
        f"Online kNN on the {new} domain (val subset) during each run (step: top-1 %):",
        "",
    ]
    for name, run in res["runs"].items():
        pts = ", ".join(f"{s}: {100 * a:.1f}" for s, a in run["online_knn"])
        lines.append(f"- {name}: {pts}")
    lines += ["", "Settings:", ""]
    for name, run in res["runs"].items():
        lines.append(f"- {name}: {run['settings']}")
    lines += ["", f"Machine: {res['machine']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    splits = load_splits("fashion_mnist", val_size=5000, seed=0, allow_download=False)
    train, val, test = splits["train"], splits["val"], splits["test"]
    new = SHIFTS[args.shift]
    inv = partial(shifted, shift=args.shift)
    train_inv = inv(train)
    mean, std = channel_stats(train)
    mean_inv, std_inv = channel_stats(train_inv)
    bank, queries = pick(train, args.bank, 1), pick(test, args.queries, 2)
    domains = {
        "original": {"bank": bank, "queries": queries, "mean": mean, "std": std},
        new: {"bank": inv(bank), "queries": inv(queries),
                     "mean": mean_inv, "std": std_inv},
    }  # fmt: skip
    # online monitor during continuation: the new domain, a val subset (never the test set)
    online_bank, online_queries = inv(pick(train, 2000, 3)), inv(pick(val, 1000, 4))

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="continue_demo_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.backbone:
        source = load_backbone(args.backbone)
        start = {"what": f"dinoflow backbone {args.backbone}", "seconds": 0.0}
    else:
        cfg0 = recipe(work / "pretrain", args.pretrain_steps, args.batch_size, args.seed)
        t0 = time.perf_counter()
        res0 = pretrain(cfg0, train, mean, std, pick(train, 2000, 3), pick(val, 1000, 4))
        source = load_backbone(res0.teacher_backbone)
        start = {"what": f"dinoflow ViT (conf/base's) pretrained here for "
                         f"{args.pretrain_steps} steps on Fashion-MNIST",
                 "seconds": round(time.perf_counter() - t0, 1),
                 "online_knn": [(h["step"], h["knn/top1_k20"]) for h in res0.knn_history]}  # fmt: skip
    official = work / "released_teacher_backbone.pth"
    save_official_layout(source, official)  # the public-release layout: backbone only, no heads

    base = recipe(
        work / "continue",
        args.continue_steps,
        args.batch_size,
        args.seed + 1,
        img_size=int(source.vit.patch_embed.img_size[0]),
        arch=arch_of(source),
    )
    loaded = DinoVisionTransformer(**source.backbone_kwargs())
    report = load_released_weights(loaded, official)
    before = evaluate(loaded, domains)
    print(f"start: {before}  (load: {report.summary().splitlines()[0]})", flush=True)

    runs: dict[str, Any] = {}
    w = args.warmup_steps
    variants = {
        "naive (from-scratch recipe, no warm-up)": naive(base, official),
        f"warm-up only ({w}-step frozen backbone, recipe otherwise)": warmup_only(
            base, official, w
        ),
        f"protected ({w}-step frozen warm-up, lr/8, m 0.999, T 0.07)": protected(base, official, w),
    }
    for i, (name, cfg) in enumerate(variants.items()):
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"run_dir": str(work / f"continue_{i}")})})  # fmt: skip
        t0 = time.perf_counter()
        res = pretrain(cfg, train_inv, mean_inv, std_inv, online_bank, online_queries)
        after = evaluate(load_backbone(res.teacher_backbone), domains)
        o = cfg.optim
        runs[name] = {
            "after": after,
            "online_knn": [(h["step"], h["knn/top1_k20"]) for h in res.knn_history],
            "seconds": round(time.perf_counter() - t0, 1),
            "settings": (f"base_lr {o.base_lr:g} (peak {peak_lr(cfg, args.batch_size):.3g}"
                         f" at batch {args.batch_size}), lr warm-up {o.warmup_epochs * 50:.0f} steps, head warm-up "
                         f"{cfg.init.head_warmup_steps} steps, teacher momentum "
                         f"{o.momentum_teacher_start} -> {o.momentum_teacher_end}, teacher temp "
                         f"{o.teacher_temp_start} -> {o.teacher_temp_end}"),
        }  # fmt: skip
        print(f"{name}: {after}  ({runs[name]['seconds']} s)", flush=True)

    result = {
        "command": "python -m experiments.continue_demo "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "shift": new,
        "start": start,
        "load_report": report.summary(),
        "knn": {"k": 20, "bank": len(bank), "queries": len(queries), "temperature": 0.07},
        "continue_steps": args.continue_steps,
        "batch_size": args.batch_size,
        "before": before,
        "runs": runs,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs seen, "
        f"torch {torch.__version__}, {args.threads} thread(s); load average (1 min) "
        f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continue_demo.json").write_text(json.dumps(result, indent=2))
    (args.out / "continue_demo.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
