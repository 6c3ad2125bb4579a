"""A teacher without heads: fitted heads or feature distillation? Measured on a short run.

1. The teacher of a dinoflow run directory (``--teacher``, default data/06_models/pretrain: the conf/base
   champion's files) distils as it is, with its own heads (``heads``: the reference point).
2. Its backbone saved in the official DINOv2 layout (``save_official_layout``: a release has no
   heads), then distilled two ways (``distillation.teacher.headless``):
   - ``fit_heads``: fresh DINO/iBOT heads fitted on the frozen backbone first
     (``teacher.fit_steps`` steps of pretraining at backbone lr 0), then distillation as with heads;
   - ``features``: 1 - cosine between linear projections of the student's CLS and patch tokens and
     the teacher's (no heads at all).
3. Each run: conf/base's distillation settings for ``--steps`` steps; then the evaluation
   pipeline's kNN top-1 (k = 20; the whole train split as the bank, the test split as queries)
   of the exported student, and the wall time (the head fit included for fit_heads).

Results: experiments/results/distill_headless.json and .md. From the repository root:

    python -m experiments.distill_headless --steps 400 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from dinoflow.config import DataConfig, DistillationConfig, deep_merge
from dinoflow.data import channel_stats, load_data
from dinoflow.evaluation.knn import backbone_knn
from dinoflow.jobs.distill import run_distillation
from dinoflow.jobs.pretrain import apply_manifest
from dinoflow.models.vit import load_backbone
from dinoflow.weights import save_official_layout

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def released_copy(teacher_dir: Path, out: Path) -> tuple[Path, dict]:
    """The run's teacher backbone in the official layout, and its architecture as a config."""
    backbone = load_backbone(teacher_dir / "teacher_backbone.pt")
    path = out / "released_teacher.pth"
    save_official_layout(backbone, path)
    kw = backbone.backbone_kwargs()
    arch = {"arch": "custom", "patch_size": kw["patch_size"], "embed_dim": kw["embed_dim"],
            "depth": kw["depth"], "num_heads": kw["num_heads"], "mlp_ratio": kw["mlp_ratio"],
            "layerscale_init": kw["layerscale_init"], "drop_path_rate": 0.0, "ffn": kw["ffn"],
            "interpolate_offset": kw["interpolate_offset"],
            "interpolate_antialias": kw["interpolate_antialias"]}
    return path, arch


def run(mode: str, teacher_dir: Path, released: Path, arch: dict, steps: int, out: Path,
        manifest: list[str] | None, fit_steps: int) -> dict:
    base = yaml.safe_load((ROOT / "conf/base/parameters_distillation.yml").read_text())["distillation"]
    teacher = ({"source": str(teacher_dir)} if mode == "heads" else
               {"source": str(released), "backbone": arch, "fit_steps": fit_steps, "headless": mode})
    params = deep_merge(base, {"teacher": teacher, "train": {
        "epochs": steps / 200, "steps_per_epoch": 200, "run_dir": str(out / mode),
        "knn_every_epochs": 1000, "progress": False, "compile": False}})
    cfg = DistillationConfig.model_validate(params)
    t0 = time.perf_counter()
    summary = run_distillation(DataConfig(), cfg, manifest)
    seconds = time.perf_counter() - t0
    splits = load_data(DataConfig())
    student = load_backbone(summary.student_backbone)
    knn = backbone_knn(student, splits["train"], splits["test"], summary.mean, summary.std, 28)
    return {"mode": mode, "steps": summary.steps, "seconds": seconds,
            "train_seconds": summary.train_seconds, "knn_top1": knn["top1_k20"],
            "teacher_heads": summary.teacher.get("heads"), "final": summary.final}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, default=ROOT / "data/06_models/pretrain")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--fit-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["heads", "fit_heads", "features"])
    ap.add_argument("--out", type=Path, default=ROOT / "data/06_models/distill_headless")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    released, arch = released_copy(args.teacher, args.out)
    manifest_file = ROOT / "data/03_primary/curated_manifest.csv"
    manifest = (pd.read_csv(manifest_file)["item_id"].astype(str).tolist()
                if manifest_file.is_file() else None)
    splits = load_data(DataConfig())
    train = apply_manifest(splits["train"], manifest)
    mean, std = channel_stats(train)
    teacher = backbone_knn(load_backbone(args.teacher / "teacher_backbone.pt"), splits["train"],
                           splits["test"], mean, std, 28)["top1_k20"]
    result = {"teacher": str(args.teacher), "teacher_knn_top1": teacher, "steps": args.steps,
              "fit_steps": args.fit_steps, "threads": args.threads,
              "load_average_1m_start": os.getloadavg()[0], "runs": []}
    for mode in args.modes:
        result["runs"].append(run(mode, args.teacher, released, arch, args.steps, args.out,
                                  manifest, args.fit_steps))
        print(json.dumps(result["runs"][-1]), flush=True)
    result["load_average_1m_end"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_headless.json").write_text(json.dumps(result, indent=1))
    lines = [f"Teacher {result['teacher']} (test kNN top-1 {teacher:.4f}); {args.steps} distillation "
             f"steps each, {args.threads} threads, load average {result['load_average_1m_start']:.1f}"
             f" -> {result['load_average_1m_end']:.1f}.", "",
             "| teacher | student test kNN top-1 (k = 20) | kept | wall time |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['knn_top1']:.4f} | {r['knn_top1'] / teacher:.1%} | "
              f"{r['seconds'] / 60:.1f} min |" for r in result["runs"]]
    (RESULTS / "distill_headless.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
