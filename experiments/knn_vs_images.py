"""kNN top-1 against images seen, for docs/results.md: what compute buys, next to raw pixels.

Reads what ``make run`` (or any pretrain + evaluation run) left, from the repository root:

    python -m experiments.knn_vs_images --label "make run" [--run-dir data/06_models/pretrain] [--metrics data/08_reporting/metrics.json]

- the online curve: the teacher's kNN top-1 (k = 20) at every check of the run (a fixed train
  bank against validation queries; ``history.json``), with raw pixels on the same bank and queries
  (``knn/raw_pixels_top1_k20``, measured by the run at its first check);
- the final point on the evaluation protocol (the whole train split against the test split):
  the run's ``knn_top1`` and ``baseline_pixels_knn_top1``.

Images seen = steps x batch size x processes (each image gives 2 global and ``n_local`` local
crops). The run's curve is stored under ``--label`` in experiments/results/knn_vs_images.json
beside the runs stored before (a longer run overwrites data/06_models/pretrain, not the stored curves);
docs/images/knn_vs_images.png draws them all.
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


def draw(curves: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.3))
    raw_online = raw_eval = None
    for i, (label, curve) in enumerate(sorted(curves.items(), key=lambda kv: kv[1]["steps"] or 0)):
        xs, ys = zip(*curve["online"], strict=True)
        ax.plot([x / 1e3 for x in xs], ys, marker="o", color=f"C{i}",
                label=f"{label}: online (train bank vs val queries)")
        if curve["eval_knn_top1"] is not None:
            ax.plot([curve["eval_images_seen"] / 1e3], [curve["eval_knn_top1"]], marker="*",
                    markersize=14, color=f"C{i}", linestyle="",
                    label=f"{label}: evaluation (train vs test) {curve['eval_knn_top1']:.3f}")
        raw_online = curve["online_raw_pixels"] if raw_online is None else raw_online
        raw_eval = curve["eval_raw_pixels_knn_top1"] if raw_eval is None else raw_eval
    if raw_online is not None:
        ax.axhline(raw_online, color="grey", linestyle=":", label=f"raw pixels, online {raw_online:.3f}")
    if raw_eval is not None:
        ax.axhline(raw_eval, color="black", linestyle="--", alpha=0.7,
                   label=f"raw pixels, evaluation {raw_eval:.3f}")
    n_crops = 2 + next(iter(curves.values()))["n_local_crops"]
    ax.set_xlabel(f"images seen (thousands; x{n_crops} crops each)")
    ax.set_ylabel("kNN top-1 (k = 20)")
    ax.set_title("What pretraining compute buys: kNN against images seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stored_curves(path: Path) -> dict[str, dict]:
    """The curves stored before, by label."""
    return json.loads(path.read_text())["runs"] if path.is_file() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "data/06_models/pretrain")
    parser.add_argument("--metrics", type=Path, default=ROOT / "data/08_reporting/metrics.json")
    parser.add_argument("--label", default="make run", help="the run's name in the picture")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/knn_vs_images.png")
    args = parser.parse_args()
    result = ROOT / "experiments/results/knn_vs_images.json"
    curves = {**stored_curves(result), args.label: load_curve(args.run_dir, args.metrics)}
    draw(curves, args.out)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"runs": curves}, indent=1))
    print(json.dumps(curves[args.label], indent=1))


if __name__ == "__main__":
    main()
