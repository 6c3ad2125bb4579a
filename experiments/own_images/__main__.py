"""Your own images, end to end: an unlabelled folder through the whole default pipeline.

1. Writes an unlabelled folder of real images: ``--images`` Fashion-MNIST *train* images (a
   fixed-seed sample) as PNG files, flat, no sub-folders, no labels.
2. Runs the default pipeline (curation -> pretrain -> evaluation -> registration) on it with the
   conf/base recipe, ``pretrain.train.epochs`` reduced to ``--epochs`` (200 steps each), exactly as
   a user would: ``kedro run --params "data.source=image_folder,data.path=<folder>,..."``.
3. For a fair comparison, pretrains the same recipe with the same budget on Fashion-MNIST itself
   (``kedro run --pipelines=pretrain``: 55,000 labelled-source images, labels unused by training).
4. Measures the label-free numbers (``dinoflow.evaluation.labelfree``, conf/base evaluation
   settings) of three networks on the SAME held-out images (the folder's test split): the folder
   model, the Fashion-MNIST model, and the random-init network the evaluation compares with.

Each kedro run happens in its own scratch project under ``--workdir`` (conf/ and pyproject.toml
copied from this checkout, its own data/ and MLflow store), so this checkout's data/ and mlflow.db
are untouched. Finished runs are reused unless ``--force``. From the repository root:

    python -m experiments.own_images --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENV = {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}  # fmt: skip
LABEL_FREE = ("rankme", "alignment", "uniformity", "view_retrieval_top1")
BETTER = {"rankme": "higher", "alignment": "lower", "uniformity": "lower",
          "view_retrieval_top1": "higher"}  # fmt: skip


def write_unlabelled_folder(folder: Path, n_images: int, seed: int = 0) -> int:
    """``n_images`` Fashion-MNIST train images (fixed-seed sample) as flat PNG files; returns n."""
    from PIL import Image

    from dinoflow.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist

    if folder.is_dir() and len(list(folder.glob("*.png"))) == n_images:
        return n_images
    arrays = load_fashion_mnist(find_fashion_mnist(allow_download=False))
    images = arrays["train_images"]  # (60000, 28, 28) uint8; the labels are not written
    rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:n_images])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, row in enumerate(rows):
        Image.fromarray(images[row]).save(folder / f"{i:06d}.png")
    return len(rows)


def scratch_project(root: Path) -> Path:
    """A Kedro project that uses this checkout's conf/ (not conf/local) and its own data/."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "conf", ignore_errors=True)
    shutil.copytree(ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "src").mkdir(exist_ok=True)  # Kedro checks that it exists; dinoflow is installed
    return root


def kedro_run(project: Path, args: list[str], log_file: Path) -> float:
    """``kedro run <args>`` in ``project``; returns the wall time (s). Output -> log_file."""
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run([str(kedro), "run", *args], cwd=project, env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    if proc.returncode:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"kedro run {' '.join(args)} failed in {project} (log {log_file}):\n{tail}")
    return time.perf_counter() - start


def _finished(project: Path, epochs: int) -> bool:
    summary = project / "data/06_models/pretrain_summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("steps") == epochs * 200


def evaluation_settings(out_dir: Path):
    """conf/base's evaluation settings (the same views and image count as the pipeline)."""
    from dinoflow.evaluation.report import EvalSettings

    params = yaml.safe_load((ROOT / "conf/base/parameters_evaluation.yml").read_text())["evaluation"]
    params = {k: v for k, v in params.items() if k not in ("model", "image_size")}
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return EvalSettings(out_dir=out_dir, **params)


def measure(folder: Path, summaries: dict[str, dict[str, Any]], progress: bool) -> dict[str, dict]:
    """Label-free numbers of each model (and the folder model's random-init twin) on the folder's
    test split, each with its own normalisation and image size."""
    from dinoflow.config import DataConfig
    from dinoflow.evaluation.labelfree import label_free_metrics
    from dinoflow.evaluation.tasks.baselines import random_init_like
    from dinoflow.models.vit import DinoVisionTransformer, load_backbone
    from dinoflow.workflow import load_data

    data = DataConfig(source="image_folder", path=str(folder))
    held_out = load_data(data)["test"]
    cfg = evaluation_settings(folder.parent / "unused")
    results = {}
    for name, summary in summaries.items():
        backbone = load_backbone(summary["teacher_backbone"]).eval()
        nets = {name: backbone}
        if name == "own_images":
            factory = partial(DinoVisionTransformer, **backbone.backbone_kwargs())
            nets["random_init"] = random_init_like(backbone, cfg.seed, factory)
        results.update(label_free_metrics(
            nets, held_out, int(summary["image_size"]), summary["mean"], summary["std"],
            cfg.view_settings(), max_images=cfg.labelfree_max_images, seed=cfg.seed,
            batch_size=cfg.batch_size, progress=progress,
        ))  # fmt: skip
    results["_held_out_images"] = {"n": min(len(held_out), cfg.labelfree_max_images or len(held_out))}
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    rows = {"own_images": "pretrained on the unlabelled folder",
            "fashion_mnist": "pretrained on Fashion-MNIST (same recipe and budget)",
            "random_init": "random initialisation (same architecture)"}  # fmt: skip
    head = "| network | " + " | ".join(f"{k} ({BETTER[k]} is better)" for k in LABEL_FREE) + " |"
    lines = [head, "|---|" + "---:|" * len(LABEL_FREE)]
    for key, label in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{results[key][k]:.4f}" for k in LABEL_FREE) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images in the folder")
    parser.add_argument("--epochs", type=int, default=4, help="pretrain.train.epochs (200 steps each)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "data/09_experiments/own_images")
    parser.add_argument("--force", action="store_true", help="re-run finished kedro runs")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    folder = work / "images"
    print(f"writing {args.images} unlabelled PNG files to {folder} ...", flush=True)
    write_unlabelled_folder(folder, args.images)
    epochs = f"pretrain.train.epochs={args.epochs},pretrain.train.time_budget_min=null"
    own, fmnist = scratch_project(work / "own_images"), scratch_project(work / "fashion_mnist")
    times = {}
    if args.force or not _finished(own, args.epochs):
        print("default pipeline on the folder (curation, pretrain, evaluation, registration) ...",
              flush=True)  # fmt: skip
        params = f"data.source=image_folder,data.path={folder},{epochs}"
        times["own_images_s"] = kedro_run(own, ["--params", params], work / "own_images.log")
    if args.force or not _finished(fmnist, args.epochs):
        print("pretrain on Fashion-MNIST with the same budget ...", flush=True)
        times["fashion_mnist_s"] = kedro_run(fmnist, ["--pipelines=pretrain", "--params", epochs],
                                             work / "fashion_mnist.log")  # fmt: skip
    summaries = {}
    for name, project in (("own_images", own), ("fashion_mnist", fmnist)):
        summary = json.loads((project / "data/06_models/pretrain_summary.json").read_text())
        summary["teacher_backbone"] = str(project / summary["teacher_backbone"])  # repo-relative
        summaries[name] = summary
    print("measuring the three networks on the folder's held-out images ...", flush=True)
    results = measure(folder, summaries, progress=sys.stderr.isatty())
    pipeline_metrics = json.loads((own / "data/08_reporting/metrics.json").read_text())
    registration = json.loads((own / "data/08_reporting/registration.json").read_text())
    out = {"results": results, "pipeline_metrics": pipeline_metrics, "times_s": times,
           "registration": {k: registration.get(k) for k in
                            ("version", "alias", "metric_name", "metric", "reason")},
           "epochs": args.epochs, "images": args.images}  # fmt: skip
    (work / "results.json").write_text(json.dumps(out, indent=2))
    n = results["_held_out_images"]["n"]
    print(f"\nLabel-free numbers on the folder's {n} held-out images "
          f"({args.epochs * 200} pretraining steps each):\n")  # fmt: skip
    print(table(results))
    print("\nthe pipeline's metrics.json (folder run): "
          + ", ".join(f"{k} {pipeline_metrics[k]:.4f}" for k in LABEL_FREE))
    reg = out["registration"]
    print(f"registered version {reg['version']} -> {reg['alias']} on {reg['metric_name']} "
          f"= {reg['metric']:.4f} ({reg['reason']})")
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
