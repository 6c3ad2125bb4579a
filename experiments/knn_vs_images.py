"""kNN top-1 against images seen, for the README: what compute buys, next to raw pixels.

Reads what ``make run`` (or any pretrain + evaluation run) left, from the repository root:

    python -m experiments.knn_vs_images [--run-dir data/06_models] [--metrics data/08_reporting/metrics.json]

- the online curve: the teacher's kNN top-1 (k = 20) at every check of the run (a fixed train
  bank against validation queries; ``history.json``), with raw pixels on the same bank and queries
  (``knn/raw_pixels_top1_k20``, measured by the run at its first check);
- the final point on the evaluation protocol (the whole train split against the test split):
  the run's ``knn_top1`` and ``baseline_pixels_knn_top1``.

Images seen = steps x batch size x processes (each image gives 2 global and ``n_local`` local
crops). Writes docs/images/knn_vs_images.png and experiments/results/knn_vs_images.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_curve(run_dir: Path, metrics_path: Path) -> dict:
    """The online points, the raw-pixel reference and the final evaluation-protocol numbers."""
    summary = json.loads((run_dir / "pretrain_summary.json").read_text()) \
        if (run_dir / "pretrain_summary.json").is_file() else {}
    config = json.loads((run_dir / "resolved_config.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    per_step = config["train"]["batch_size"] * int(summary.get("world_size", 1))
    online = [(int(h["step"]) * per_step, h["knn/top1_k20"]) for h in history if "knn/top1_k20" in h]
    raw = next((h["knn/raw_pixels_top1_k20"] for h in history if "knn/raw_pixels_top1_k20" in h), None)
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    first_above = next((n for n, v in online if raw is not None and v > raw), None)
    return {
        "images_per_step": per_step, "n_local_crops": config["crops"]["n_local"],
        "online": online, "online_raw_pixels": raw, "online_first_above_raw_pixels": first_above,
        "eval_images_seen": online[-1][0] if online else None,
        "eval_knn_top1": metrics.get("knn_top1"), "eval_raw_pixels_knn_top1": metrics.get("baseline_pixels_knn_top1"),
        "precision": summary.get("precision"), "steps": summary.get("steps"),
    }


def draw(curve: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = zip(*curve["online"], strict=True)
    ax.plot([x / 1e3 for x in xs], ys, marker="o", label="features, online (train bank vs val queries)")
    if curve["online_raw_pixels"] is not None:
        ax.axhline(curve["online_raw_pixels"], color="C0", linestyle="--", alpha=0.6,
                   label=f"raw pixels, online {curve['online_raw_pixels']:.3f}")
    if curve["eval_knn_top1"] is not None:
        x = curve["eval_images_seen"] / 1e3
        ax.plot([x], [curve["eval_knn_top1"]], marker="*", markersize=14, color="C1", linestyle="",
                label=f"features, evaluation (train vs test) {curve['eval_knn_top1']:.3f}")
        if curve["eval_raw_pixels_knn_top1"] is not None:
            ax.axhline(curve["eval_raw_pixels_knn_top1"], color="C1", linestyle="--", alpha=0.6,
                       label=f"raw pixels, evaluation {curve['eval_raw_pixels_knn_top1']:.3f}")
    ax.set_xlabel(f"images seen (thousands; x{2 + curve['n_local_crops']} crops each)")
    ax.set_ylabel("kNN top-1 (k = 20)")
    ax.set_title("What pretraining compute buys: kNN against images seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "data/06_models")
    parser.add_argument("--metrics", type=Path, default=ROOT / "data/08_reporting/metrics.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/knn_vs_images.png")
    args = parser.parse_args()
    curve = load_curve(args.run_dir, args.metrics)
    draw(curve, args.out)
    result = ROOT / "experiments/results/knn_vs_images.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(curve, indent=1))
    print(json.dumps(curve, indent=1))


if __name__ == "__main__":
    main()
