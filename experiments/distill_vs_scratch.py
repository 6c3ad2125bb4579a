"""The distilled student against the same architecture pretrained from scratch for the same
wall-clock time (docs/results.md, "Distillation"). Three phases, from the repository root:

    # 1. per-step cost of a distillation step and of a from-scratch pretraining step of the
    #    student, in one process, alternating (torch.compile'd as conf/base runs them):
    python -m experiments.distill_vs_scratch probe --distill-steps 3200
    # 2. the distillation itself: the pipeline, from the run directory of the champion
    kedro run --pipelines=distillation --params=distillation.teacher.source=data/06_models/pretrain
    # 3. the student architecture pretrained from scratch (the pretrain job, conf/base's recipe)
    #    for the number of steps that takes the distillation's time, then the evaluation job:
    python -m experiments.distill_vs_scratch scratch --steps N
    python -m experiments.distill_vs_scratch report

Or both on the same wall-clock budget of the training loop (each run times its own steps and
trains what fits, dinoflow.training.budget), which needs no probe:

    kedro run --pipelines=distillation --params=distillation.train.time_budget_min=12,distillation.train.epochs=100
    python -m experiments.distill_vs_scratch scratch --steps 20000 --time-budget-min 12

The student architecture is conf/base's distillation backbone; the from-scratch run uses
conf/base's pretrain settings with that backbone (its own heads, masking, EMA teacher). The
evaluation is the evaluation pipeline's code with conf/base's evaluation settings.
Results: experiments/results/distill_vs_scratch.json and .md.
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

from dinoflow.config import DataConfig, DistillationConfig, PretrainConfig, deep_merge
from dinoflow.data import load_data
from dinoflow.jobs.distill import load_teacher
from dinoflow.jobs.evaluate import run_evaluation
from dinoflow.jobs.pretrain import apply_manifest, run_pretraining
from dinoflow.methods import DINOv2, Distillation
from dinoflow.models.vit import load_backbone
from dinoflow.training import Trainer, build_loader, wrap_for_training

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "distill_vs_scratch.json"
SCRATCH_DIR = ROOT / "data/06_models/scratch"


def _yaml(name: str, section: str) -> dict:
    return yaml.safe_load((ROOT / "conf/base" / name).read_text())[section]


def distillation_config() -> DistillationConfig:
    params = _yaml("parameters_distillation.yml", "distillation")
    return DistillationConfig.model_validate(deep_merge(params, {"teacher": {"source": "data/06_models/pretrain"}}))


def scratch_config(steps: int, time_budget_min: float | None = None) -> PretrainConfig:
    """conf/base pretraining with the distillation student's backbone, ``steps`` steps long
    (with a time budget: as many steps as fit in it, ``steps`` at most)."""
    student = distillation_config().backbone.model_dump()
    return PretrainConfig.model_validate(deep_merge(_yaml("parameters_pretrain.yml", "pretrain"), {
        "backbone": student, "train": {"epochs": steps / 200, "steps_per_epoch": 200,
                                       "time_budget_min": time_budget_min, "run_dir": str(SCRATCH_DIR)}}))


def _manifest() -> list[str] | None:
    path = ROOT / "data/03_primary/curated_manifest.csv"
    return pd.read_csv(path)["item_id"].astype(str).tolist() if path.is_file() else None


def _save(update: dict) -> dict:
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    result.update(update)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    return result


def probe(distill_steps: int, blocks: int = 6, block: int = 10) -> dict:
    """Seconds per step of both, compiled, alternating blocks of ``block`` steps."""
    from dinoflow.data import channel_stats

    device = torch.device("cpu")
    train = apply_manifest(load_data(DataConfig())["train"], _manifest())
    mean, std = channel_stats(train)
    dcfg = distillation_config()
    teacher = load_teacher(dcfg.teacher, 1, 28).frozen()
    distillation = Distillation(dcfg, teacher, 1)
    dp = distillation.cfg
    drun = Trainer(distillation, dp, len(train), 1, device)
    scfg = scratch_config(distill_steps)
    scratch = DINOv2(scfg, 1)
    srun = Trainer(scratch, scfg, len(train), 1, device)
    d_model = wrap_for_training(distillation.student, teacher, dp, 1, device, False)
    s_model = wrap_for_training(scratch.student, scratch.teacher, scfg, 1, device, False)
    d_batches = iter(build_loader(dp, train, mean, std, 0, 1, 0, drun.state.last_step, device))
    s_batches = iter(build_loader(scfg, train, mean, std, 0, 1, 0, distill_steps, device))

    def d_step(i: int) -> None:
        drun.train_mode(d_model)
        drun.step(d_model, next(d_batches), i)

    def s_step(i: int) -> None:
        srun.train_mode(s_model)
        srun.step(s_model, next(s_batches), i)

    times: dict[str, list[float]] = {"distill": [], "scratch": []}
    for warm in range(3):  # compiling, then two more
        d_step(warm)
        s_step(warm)
    step = 3
    for b in range(blocks):
        for name, fn in (("distill", d_step), ("scratch", s_step))[:: 1 if b % 2 == 0 else -1]:
            t0 = time.perf_counter()
            for i in range(block):
                fn(step + i)
            times[name].append((time.perf_counter() - t0) / block)
        step += block
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    out = {"probe": {"seconds_per_step": med, "blocks": times, "load_average_1m": os.getloadavg()[0],
                     "distill_steps": distill_steps,
                     "scratch_steps_same_time": int(round(distill_steps * med["distill"] / med["scratch"]))}}
    print(json.dumps(out, indent=1))
    return _save(out)


def scratch(steps: int, time_budget_min: float | None = None) -> dict:
    """Pretrain the student architecture from scratch for ``steps`` steps (or for the steps
    that fit in ``time_budget_min``, the distillation's own budget), then evaluate it."""
    cfg = scratch_config(steps, time_budget_min)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = run_pretraining(DataConfig(), cfg, _manifest())
    seconds = time.perf_counter() - t0
    params = _yaml("parameters_evaluation.yml", "evaluation")
    metrics, _ = run_evaluation(DataConfig(), params, summary, load_backbone(summary.teacher_backbone),
                                str(ROOT / "data/08_reporting/scratch"))
    out = {"scratch": {"steps": summary.steps, "seconds": seconds, "time_budget_min": time_budget_min,
                       "precision": summary.precision, "load_average_1m_start": load,
                       "load_average_1m_end": os.getloadavg()[0],
                       "images_per_second": summary.images_per_second, "metrics": metrics}}
    (ROOT / "data/08_reporting/scratch/metrics.json").write_text(json.dumps(metrics, indent=1))
    return _save(out)


def report() -> dict:
    """The distillation's numbers beside the scratch run's -> the table of docs/results.md."""
    summary = json.loads((ROOT / "data/06_models/distillation/distillation_summary.json").read_text())
    metrics = json.loads((ROOT / "data/08_reporting/distillation/metrics.json").read_text())
    result = _save({"distillation": {"steps": summary["steps"], "seconds": summary["train_seconds"],
                                     "student_flops": summary["student_flops"],
                                     "teacher_flops": summary["teacher_flops"],
                                     "images_per_second": summary["images_per_second"],
                                     "metrics": metrics}})
    s, d = result.get("scratch", {}), result["distillation"]
    t = metrics["teacher_knn_top1"]
    lines = ["| model | FLOPs / image | training | wall time | test kNN top-1 (k = 20) | of the teacher's | linear top-1 |",
             "|---|---|---|---|---|---|---|",
             f"| teacher (conf/base champion) | {d['teacher_flops'] / 1e6:.1f} M | pretrain | - | "
             f"{t:.4f} | 100% | {metrics['teacher_linear_top1']:.4f} |",
             f"| student, distilled | {d['student_flops'] / 1e6:.1f} M | {d['steps']} steps | "
             f"{d['seconds'] / 60:.1f} min | {metrics['knn_top1']:.4f} | {metrics['knn_top1'] / t:.1%} | "
             f"{metrics['linear_top1']:.4f} |"]
    if s:
        m = s["metrics"]
        lines.append(f"| student, from scratch | {d['student_flops'] / 1e6:.1f} M | {s['steps']} steps | "
                     f"{s['seconds'] / 60:.1f} min | {m['knn_top1']:.4f} | {m['knn_top1'] / t:.1%} | "
                     f"{m['linear_top1']:.4f} |")
    md = "\n".join(lines) + "\n"
    RESULTS.with_suffix(".md").write_text(md)
    _picture(result, t, ROOT / "docs/images/distillation.png")
    print(md)
    return result


def _picture(result: dict, teacher_knn: float, path: Path) -> None:
    """kNN top-1 against training wall time and FLOPs per image: teacher, distilled, scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, s = result["distillation"], result.get("scratch")
    rows = [("teacher\n(conf/base champion)", teacher_knn, d["teacher_flops"], "tab:grey"),
            ("student,\ndistilled", d["metrics"]["knn_top1"], d["student_flops"], "tab:blue")]
    if s:
        rows.append(("student,\nfrom scratch", s["metrics"]["knn_top1"], d["student_flops"], "tab:orange"))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bars = ax.bar([r[0] for r in rows], [r[1] for r in rows], color=[r[3] for r in rows])
    for bar, (_, knn, flops, _) in zip(bars, rows, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, knn + 0.002, f"{knn:.3f}\n{flops / 1e6:.1f} MFLOP",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(teacher_knn * 0.97, color="tab:red", ls="--", lw=1, label="97% of the teacher")
    ax.set_ylim(0.7, max(r[1] for r in rows) + 0.03)
    ax.set_ylabel("test kNN top-1 (k = 20)")
    ax.set_title("Distillation vs the same student from scratch (the same training time)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["probe", "scratch", "report"])
    ap.add_argument("--distill-steps", type=int, default=3200)
    ap.add_argument("--steps", type=int, help="scratch: pretraining steps (with a budget: the cap)")
    ap.add_argument("--time-budget-min", type=float, default=None,
                    help="scratch: the distillation's distillation.train.time_budget_min")
    args = ap.parse_args(argv)
    if args.phase == "probe":
        probe(args.distill_steps)
    elif args.phase == "scratch":
        scratch(args.steps, args.time_budget_min)
    else:
        report()


if __name__ == "__main__":
    main()
