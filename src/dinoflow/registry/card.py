"""The model card of a registered version: markdown, pure (``store`` logs it and sets it as the
version's description)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dinoflow.registry.model import PREPROCESSING

__all__ = ["model_card"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _use(
    model_name: str,
    decision: Mapping[str, Any],
    summary: Mapping[str, Any],
    embedder_name: str | None,
) -> list[str]:
    """How to load and serve the version."""
    v = decision["version"]
    return [
        "## Use",
        "```python",
        "import mlflow",
        f'model = mlflow.pytorch.load_model("models:/{model_name}/{v}")',
        "x = model.preprocess(images_uint8)       # (B, C, H, W) uint8 -> normalised float32",
        "cls = model(x)                          # (B, D) CLS embedding",
        "patches = model.forward_patches(x)      # (B, N, D) patch tokens",
        "```",
        f"Preprocessing: {PREPROCESSING}",
        f"mean {list(summary.get('mean', []))}, std {list(summary.get('std', []))}, "
        f"image_size {summary.get('image_size')}, channels {summary.get('channels')}.",
        "",
        *(
            [
                f"Serve (image files in, embeddings out): `mlflow models serve -m "
                f"models:/{embedder_name}@{decision['alias']} --env-manager local -h 127.0.0.1` "
                f"(`{embedder_name}`: the same weights, alias `{decision['alias']}`).",
                "",
            ]
            if embedder_name
            else []
        ),
    ]


def _provenance(
    decision: Mapping[str, Any], summary: Mapping[str, Any], lineage: Mapping[str, Any]
) -> list[str]:
    """The data, the code and the runs the version came from."""
    data = summary.get("data") or {}
    return [
        "## Data",
        f"- source: `{data.get('source')}`, path: `{data.get('path')}`, seed {data.get('seed')}, "
        f"val_size {data.get('val_size')}",
        f"- curated data (DVC md5 of data/03_primary/curated_manifest.csv): "
        f"`{lineage.get('curated_data_md5', 'unknown')}`",
        f"- training images: {summary.get('n_train_images')}",
        f"- evaluation data id: `{decision.get('eval_data_id')}`",
        "",
        "## Code and runs",
        f"- git commit (pretrain): `{lineage.get('pretrain_git_commit', 'unknown')}`",
        f"- git commit (registration): `{lineage.get('git_commit', 'unknown')}`",
        f"- pretrain run: `{lineage.get('pretrain_run_id')}`, evaluation run: "
        f"`{lineage.get('evaluation_run_id')}`, registration run: "
        f"`{lineage.get('registration_run_id')}`",
        f"- Kedro env: `{lineage.get('kedro_env', 'unknown')}`; config fingerprint "
        f"`{summary.get('fingerprint')}`",
        "",
    ]


def _numbers(
    decision: Mapping[str, Any],
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    backbone_kwargs: Mapping[str, Any],
) -> list[str]:
    """Architecture, training, metrics and the promotion decision."""
    return [
        "## Architecture",
        "| key | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(val)} |" for k, val in backbone_kwargs.items()),
        "",
        "## Training",
        f"- steps: {summary.get('steps')}, images/s: {_fmt(summary.get('images_per_second'))}",
        *(
            f"- final {k}: {_fmt(val)}"
            for k, val in (summary.get("final") or {}).items()
            if k.startswith("loss/")
        ),
        "",
        "## Metrics",
        "| metric | value |",
        "|---|---|",
        *(
            f"| {k} | {val:.4f} |"
            for k, val in sorted(metrics.items())
            if isinstance(val, int | float) and not isinstance(val, bool)
        ),
        "",
        "## Promotion",
        f"- metric: {decision.get('metric_why') or decision.get('metric_name', 'knn_top1')}",
        f"- this version: {decision['metric']:.4f}; champion before: "
        + (
            "none"
            if decision.get("champion_metric") is None
            else f"{decision['champion_metric']:.4f} (v{decision['champion_version']})"
        ),
        "",
    ]


def model_card(
    model_name: str,
    decision: Mapping[str, Any],
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    lineage: Mapping[str, Any],
    backbone_kwargs: Mapping[str, Any],
    pictures: Sequence[str] = (),
    embedder_name: str | None = None,
) -> str:
    """Markdown: how to use the version, data version, code, params, metrics, pictures.

    ``pictures`` are file names relative to the card (logged next to it). ``embedder_name``:
    the pyfunc embedding service registered over this version (a "Serve" line).
    """
    lines = [
        f"# {model_name} v{decision['version']}",
        "",
        f"**Alias:** `{decision['alias']}` ({decision['reason']}).",
        "",
        *_use(model_name, decision, summary, embedder_name),
        *_provenance(decision, summary, lineage),
        *_numbers(decision, summary, metrics, backbone_kwargs),
    ]
    if pictures:
        lines += ["## Pictures", *(f"![{Path(p).stem}]({p})" for p in pictures), ""]
    return "\n".join(lines)
