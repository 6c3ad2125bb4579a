"""The end of a run: the history files and the loss curves."""

from __future__ import annotations

import json
from pathlib import Path

from dinoflow import tracking
from dinoflow.config import PretrainConfig
from dinoflow.files import atomic_write_json, atomic_write_text


def write_history(history: list[dict[str, float]], run_dir: Path, cfg: PretrainConfig) -> None:
    """``history.json`` (every row), DVC plot files, the curves PNG and the resolved config."""
    atomic_write_json(run_dir / "history.json", history, indent=None)
    # DVC plots (dvc.yaml) need records that share their keys: losses and kNN apart
    for name, key in (("history_train.json", "loss/total"), ("history_knn.json", "knn/top1_k20")):
        rows = [h for h in history if key in h]
        common = set.intersection(*(set(h) for h in rows)) if rows else set()
        atomic_write_json(
            run_dir / name, [{k: v for k, v in h.items() if k in common} for h in rows], indent=None
        )
    curve = plot_training_curves(history, run_dir / "training_curves.png")
    tracking.log_artifact(curve, "pretrain")
    resolved = json.dumps(cfg.model_dump(mode="json"), indent=2)
    atomic_write_text(run_dir / "resolved_config.json", resolved)
    tracking.log_text(resolved, "pretrain/resolved_config.json")


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss terms, teacher entropy, schedules and online kNN over steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("losses", ["loss/total", "loss/dino", "loss/ibot", "loss/koleo"]),
        ("teacher target entropy", ["monitor/teacher_entropy"]),
        ("schedules", ["schedule/teacher_temp", "schedule/momentum"]),
        ("online kNN top-1 (k=20)", ["knn/top1_k20"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    label=key.split("/")[-1],
                    marker="." if len(pts) < 30 else None,
                )
        if keys == ["knn/top1_k20"]:  # the raw-pixel reference on the same bank and queries
            raw = [h["knn/raw_pixels_top1_k20"] for h in history if "knn/raw_pixels_top1_k20" in h]
            if raw:
                ax.axhline(raw[0], color="grey", linestyle="--", label=f"raw pixels {raw[0]:.3f}")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. no online kNN in a short run
            ax.text(
                0.5,
                0.5,
                "not measured in this run",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
