"""Gram anchoring (DINOv3) on conf/base: the same run with and without, at equal steps.

Curates Fashion-MNIST once (``kedro run --pipelines=curation``), then for each variant pretrains
``--steps`` steps of conf/base and evaluates the teacher (``kedro run --pipelines=pretrain,
evaluation``), exactly as a user runs them, in one scratch project under ``--workdir`` (conf/
copied from this checkout, its own data/ and MLflow store). Kept per variant: the evaluation
metrics (kNN, linear, segmentation mIoU, label-free), the PCA maps of patch features and the
training history; the table goes to experiments/results/gram_anchoring.{json,md}, the PCA maps
side by side to docs/images/gram_pca.png.

    python -m experiments.gram_anchoring --steps 4000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from experiments.own_images.__main__ import kedro_run, scratch_project

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments/results/gram_anchoring.json"
KEYS = ("knn_top1", "linear_top1", "seg_miou", "seg_pixel_accuracy", "rankme", "view_retrieval_top1")


def variants(steps: int) -> dict[str, list[str]]:
    """name -> --params. The Gram teacher: the EMA at a quarter of the run, refreshed every
    quarter (DINOv3 anchors late in a long run and refreshes every 10k of 1M+ iterations)."""
    quarter = steps // 4
    return {
        "DINOv2 (conf/base)": [],
        "+ Gram anchoring (weight 1)": [
            "pretrain.gram.weight=1.0",
            f"pretrain.gram.first_update_step={quarter}",
            f"pretrain.gram.update_every={quarter}",
        ],
    }


def run_variant(project: Path, params: list[str], steps: int, out: Path) -> dict:
    epochs = steps / 200  # conf/base: steps_per_epoch 200
    all_params = ",".join([f"pretrain.train.epochs={epochs!r}", *params])
    seconds = kedro_run(project, ["--pipelines=pretrain,evaluation", "--params", all_params],
                        project / "run.log")  # fmt: skip
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    summary = json.loads((project / "data/06_models/pretrain_summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for png in (project / "data/08_reporting/evaluation").glob("*.png"):
        shutil.copy(png, out / png.name)
    shutil.copy(project / "data/06_models/pretrain/history.json", out / "history.json")
    return {"params": params, "seconds": round(seconds), "steps": summary["steps"],
            "images_per_second": summary.get("images_per_second"),
            "final_loss": summary["final"], **{k: metrics.get(k) for k in KEYS}}


def side_by_side(results: dict, folders: dict[str, Path], path: Path) -> Path:
    """The evaluation's PCA maps of each variant, one row each, titled with its mIoU and kNN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = [n for n in results if (folders[n] / "pca_scenes.png").is_file()]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        ax.imshow(Image.open(folders[name] / "pca_scenes.png"))
        r = results[name]
        ax.set_title(f"{name}: seg mIoU {r['seg_miou']:.3f}, kNN top-1 {r['knn_top1']:.3f}")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(results: dict) -> str:
    lines = ["| variant | steps | images/s | kNN top-1 | linear top-1 | seg mIoU | seg pixel acc. "
             "| RankMe | view top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['steps']} | {r['images_per_second']:.0f} | {r['knn_top1']:.4f} "
                     f"| {r['linear_top1']:.4f} | {r['seg_miou']:.4f} | {r['seg_pixel_accuracy']:.4f} "
                     f"| {r['rankme']:.1f} | {r['view_retrieval_top1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "data/10_experiments/gram")
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args()
    project = scratch_project(args.workdir / "project")
    if not (project / "data/03_primary/curated_manifest.csv").is_file():
        seconds = kedro_run(project, ["--pipelines=curation"], args.workdir / "curation.log")
        print(f"curation: {seconds:.0f} s", flush=True)
    results = json.loads(RESULTS.read_text())["variants"] if RESULTS.is_file() else {}
    folders = {}
    for i, (name, params) in enumerate(variants(args.steps).items()):
        folders[name] = args.workdir / f"variant_{i}"
        if name in results and results[name]["steps"] == args.steps:
            continue
        start = time.perf_counter()
        results[name] = run_variant(project, params, args.steps, folders[name])
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        RESULTS.write_text(json.dumps({"steps": args.steps, "variants": results}, indent=1))
    print(table(results))
    RESULTS.with_suffix(".md").write_text(
        f"# Gram anchoring on conf/base, {args.steps} steps each\n\n{table(results)}\n")
    print(side_by_side(results, folders, ROOT / "docs/images/gram_pca.png"))


if __name__ == "__main__":
    main()
