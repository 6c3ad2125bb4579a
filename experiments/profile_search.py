"""One run of the CPU-profile search (docs/results.md, "How the CPU profile was chosen"): conf/base's pretrain parameters with
JSON overrides, online kNN as it goes, and optionally the full kNN of the evaluation pipeline.

    python -m experiments.profile_search base --final-knn      # conf/base as make run trains it (6,400 steps)
    python -m experiments.profile_search b32 '{"train": {"batch_size": 32, "steps_per_epoch": 200}}' --steps 3200

``--steps`` counts steps of the run's batch (a multiple of its ``steps_per_epoch``). The runs A-L of
the table of docs/results.md used batch 64 and 700 steps (``'{"train": {"batch_size": 64, "steps_per_epoch":
100}}' --steps 700``) at 1 thread, two runs side by side on the 2-core machine; their logs are in
experiments/results/profile_search/. ``--final-knn`` adds the number the
issue asks for: top-1 of k = 20 on the test split with the whole train split as the bank.
``experiments/profile_sweep.py`` runs many of these side by side (e.g. on a GPU box).
The last line printed is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

from dinoflow.config import DataConfig, PretrainConfig, deep_merge
from dinoflow.data import load_data
from dinoflow.evaluation.knn import backbone_knn
from dinoflow.jobs.pretrain import run_pretraining
from dinoflow.models.vit import load_backbone

ROOT = Path(__file__).resolve().parents[1]


def full_knn(backbone_path: str, data: DataConfig, mean, std, size: int, device: str) -> dict[str, float]:
    """kNN on the test split with the whole train split as the bank (as the evaluation pipeline);
    CLS (the reported number) and, for information, CLS + mean patch token."""
    splits = load_data(data)
    backbone = load_backbone(backbone_path)
    out = {}
    for label, features in (("cls", "cls"), ("cls_patchmean", "cls+patch_mean")):
        res = backbone_knn(backbone, splits["train"], splits["test"], mean, std, size, device,
                           ks=(10, 20, 100), batch_size=1024, features=features)
        out.update({f"{label}_{k}": round(v, 4) for k, v in res.items() if k.startswith("top1")})
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON merged into conf/base's pretrain")
    parser.add_argument("--steps", type=int, default=6400, help="total steps (conf/base: 6,400 of batch 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="fp32", help="fp32 (the sweeps of docs/results.md) | bf16 | auto (as make run)")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="train.time_budget_min: the length is what fits, --steps the cap (as make run)")
    parser.add_argument("--workers", type=int, default=None, help="data-loader workers (conf/base's by default)")
    parser.add_argument("--knn-every", type=int, default=1600, help="online kNN every N steps")
    parser.add_argument("--final-knn", action="store_true", help="full test-split kNN at the end")
    parser.add_argument("--data-path", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--run-root", default="/tmp/profile_search")
    parser.add_argument("--progress", action="store_true", help="the progress bar (off: plain log lines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    params = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    params = deep_merge(params, json.loads(args.overrides))
    per_epoch = params["train"]["steps_per_epoch"]  # conf/base's, or the overrides'
    if args.steps % per_epoch:
        raise SystemExit(f"--steps: a multiple of steps_per_epoch ({per_epoch})")
    params = deep_merge(params, {"train": {"epochs": args.steps // per_epoch, "time_budget_min": args.budget_min,
                                           "threads": args.threads,
                                           "knn_every_epochs": args.knn_every / per_epoch}})
    train_over = {"run_dir": f"{args.run_root}/{args.name}", "progress": args.progress, "resume": False,
                  "checkpoint_every_steps": 100_000, "device": args.device, "precision": args.precision}
    if args.workers is not None:
        train_over["num_workers"] = args.workers
    params = deep_merge(params, {"train": train_over, "launcher": {"type": "local"}})
    cfg = PretrainConfig.model_validate(params)
    data_params = yaml.safe_load((ROOT / "conf/base/parameters_data.yml").read_text())["data"]
    if args.data_path:
        data_params.update({"path": args.data_path, "allow_download": False})
    data = DataConfig.model_validate(data_params)
    start = time.time()

    def on_knn(step: int, top1: float) -> None:
        print(f"{args.name} step {step} t {time.time() - start:.0f}s knn {top1:.4f}", flush=True)

    summary = run_pretraining(data, cfg, on_knn=on_knn)
    train_s = time.time() - start
    result = {"name": args.name, "overrides": json.loads(args.overrides), "steps": summary.steps,
              "precision": summary.precision,
              "train_s": round(train_s), "images_per_s": round(summary.images_per_second, 1),
              "online_knn": [[h["step"], round(h["knn/top1_k20"], 4)] for h in summary.knn_history]}
    if args.final_knn:
        result["test_knn"] = full_knn(summary.teacher_backbone, data, summary.mean, summary.std,
                                      cfg.crops.global_size, args.device)
    result["total_s"] = round(time.time() - start)
    print(f"{args.name} done {result['total_s']}s", flush=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
