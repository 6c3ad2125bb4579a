"""MLflow model registry: the registered backbone, champion/challenger promotion, the model card.

The registered model ``dinoflow-backbone`` is a ``RegisteredBackbone``: the teacher
backbone plus the preprocessing it was trained with. It is logged with ``mlflow.pytorch`` in the
pickle format (``torch.export``'s "pt2" keeps only ``forward`` and fixes the image size; the
contract also needs ``forward_patches`` and any multiple of the patch size). The class lives here,
in the library, so unpickling it in a fresh process only needs ``import dinoflow.registry``; the
package source also travels with the model (``code_paths``) for machines without dinoflow.

Promotion: a new version takes the alias ``champion`` only if its ``registration.metric`` beats
the current champion's *on the same evaluation data* (same ``eval_data_id``); otherwise it gets
``challenger``. The metric defaults to ``auto``: kNN top-1 with labels, view retrieval top-1
without (``resolve_registration_metric``); lower-is-better metrics (alignment, uniformity) are
compared the other way round. The numbers, the metric's name, the data identities and the
decision are kept as version tags, so each decision can be checked later from the registry alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError, field_validator
from torch import nn

from dinoflow.config import ConfigError, Strict
from dinoflow.data import data_identity
from dinoflow.data.transforms import DEFAULT_CROP_RATIO
from dinoflow.evaluation.labelfree import LABEL_FREE_KEYS
from dinoflow.evaluation.metric_spec import base_name, direction, is_known_metric, needs_labels

log = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EXPERIMENT",
    "MODEL_NAME",
    "RegisteredBackbone",
    "RegistrationConfig",
    "log_and_register",
    "model_card",
    "promote",
    "register_pretrained",
    "resolve_registration_metric",
]

MODEL_NAME = "dinoflow-backbone"
EXPERIMENT = "dinoflow"
CHAMPION = "champion"
CHALLENGER = "challenger"
# Model-version tags: what promotion compares, and where the version came from. The value is kept
# under "dinoflow.<metric name>" (so "dinoflow.knn_top1", as before, for kNN), the name under
# TAG_PROMOTION_METRIC (also a tag of the registration run).
TAG_METRIC = "dinoflow.knn_top1"
TAG_PROMOTION_METRIC = "dinoflow.promotion_metric"
AUTO_METRIC = "auto"
# ``auto`` picks these. Without labels: view retrieval top-1, because it is higher-is-better and in
# [0, 1] like kNN top-1, and it needs both things a good backbone has: views of one image close
# (alignment alone is won by a collapsed network) and different images apart (uniformity and
# RankMe alone are won by a random network); a collapsed network scores ~1/N.
AUTO_LABELLED_METRIC = "knn_top1"
AUTO_LABEL_FREE_METRIC = "view_retrieval_top1"
TAG_EVAL_DATA = "dinoflow.eval_data_id"
TAG_DECISION = "dinoflow.decision"
# Atomic registration: a version is born "started" (its creation tags) and becomes "complete"
# as the very last step; the next registration removes a started, incomplete one.
TAG_STARTED = "dinoflow.registration_started"
TAG_COMPLETE = "dinoflow.registration_complete"
TAG_WEIGHTS = "dinoflow.weights_sha256"
TAG_PREVIOUS_CHAMPION = "dinoflow.previous_champion"
MAX_DESCRIPTION = 4900  # MLflow's SQL store keeps descriptions in a 5000-character column

PREPROCESSING = (
    "images: uint8 (B, C, H, W) or (B, H, W) -> model.preprocess(images): channels matched to "
    "in_chans (grey repeated / RGB to luma), the shorter side resized to "
    "round(image_size / crop_ratio) (bilinear, antialiased; aspect kept; an image whose shorter "
    "side is image_size is not resized), the centre image_size x image_size crop kept, "
    "scaled to [0, 1], normalised with mean/std (per channel) -> float32 (B, in_chans, S, S). "
    "forward / forward_patches take that tensor; any H, W that are multiples of patch_size work "
    "(position embeddings are resampled)."
)


class RegistrationConfig(Strict):
    """``params:registration`` (conf/base/parameters_registration.yml)."""


    model_name: str = MODEL_NAME
    # key in metrics.json that promotion compares; "auto": knn_top1 with labels,
    # view_retrieval_top1 without (resolve_registration_metric); alignment/uniformity: lower wins
    metric: str = AUTO_METRIC
    min_improvement: float = Field(0.0, ge=0.0)  # champion moves only if it beats old by this
    pictures: list[str] = Field(default_factory=list)  # glob patterns of PNGs for the model card
    input_example_batch: int = Field(2, ge=1)
    log_code: bool = True  # ship src/dinoflow with the model (code_paths)
    # the pyfunc embedding service over each registered version (same aliases); None: none
    embedder_name: str | None = "dinoflow-embedder"

    @field_validator("metric")
    @classmethod
    def _promotable(cls, value: str) -> str:
        if value == AUTO_METRIC or (is_known_metric(value) and base_name(value) == value):
            return value
        raise ValueError(
            f"{value!r} is not a metric the evaluation writes: choose auto, one of "
            f"{', '.join(LABEL_FREE_KEYS)} (any data), or with labels knn_top1, knn_top5, "
            "knn_top1_k<k>, linear_top1, seg_miou, ..."
        )


def resolve_registration_metric(metric: str, labelled: bool) -> str:
    """The metrics.json key promotion compares, decided before any work.

    metric: ``registration.metric`` ("auto" or a key); labelled: whether the data has labels
    (``dinoflow.evaluation.metric_spec.data_is_labelled``). "auto" -> knn_top1 with labels,
    view_retrieval_top1 without. Raises ConfigError naming ``registration.metric`` when the
    metric cannot exist for the data (a labelled metric on unlabelled data) or is unknown.
    """
    if metric == AUTO_METRIC:
        return AUTO_LABELLED_METRIC if labelled else AUTO_LABEL_FREE_METRIC
    try:
        RegistrationConfig(metric=metric)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"registration.metric: {msg}") from None
    if needs_labels(metric) and not labelled:
        raise ConfigError(
            f"registration.metric: {metric!r} needs labels, and this data has none (labels are the "
            "first-level sub-folders, at least 2 of them, every image in one); use auto or one of "
            f"{', '.join(LABEL_FREE_KEYS)}"
        )
    return metric


def _why(metric: str, requested: str, labelled: bool | None) -> str:
    """One line for the model card and the logs: the promotion metric and why it was chosen."""
    better = "higher" if direction(metric) == "higher" else "lower"
    if requested != AUTO_METRIC:
        return f"`{metric}` (registration.metric; {better} is better)"
    data = "labelled data" if labelled else "no labels"
    return f"`{metric}` (registration.metric auto: {data}; {better} is better)"


class RegisteredBackbone(nn.Module):
    """The registered model: a DINOv2 backbone and its preprocessing.

    forward(x (B, C, H, W) float, preprocessed) -> CLS embedding after the final norm (B, D)
    forward_patches(x) -> patch tokens after the final norm (B, N, D), N = (H/p)(W/p)
    preprocess(uint8 images) -> x as the backbone saw it in training (see ``preprocessing``)
    embed(uint8 images) -> forward(preprocess(images))

    Attributes: mean, std (in [0, 1] units, one per channel or one for all), image_size (the
    centre crop), crop_ratio (of the crop to the resized shorter side), in_chans, patch_size,
    embed_dim, depth, preprocessing (the text above).
    """

    def __init__(
        self,
        backbone: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        channels: int | None = None,
        crop_ratio: float = DEFAULT_CROP_RATIO,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must have the same length")
        self.image_size = int(image_size)
        self.in_chans = int(channels or getattr(backbone, "in_chans", len(self.mean)))
        self.patch_size = int(backbone.patch_size)
        self.embed_dim = int(backbone.embed_dim)
        self.depth = int(backbone.depth)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of {self.patch_size}")
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.crop_ratio = float(crop_ratio)
        self.preprocessing = PREPROCESSING

    def __setstate__(self, state: dict[str, Any]) -> None:
        # versions pickled before crop_ratio existed get the default
        state.setdefault("crop_ratio", DEFAULT_CROP_RATIO)
        super().__setstate__(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) preprocessed -> CLS embedding (B, D)."""
        return self.backbone.forward_features(x)["x_norm_clstoken"]

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) preprocessed -> patch tokens (B, N, D)."""
        return self.backbone.forward_features(x)["x_norm_patchtokens"]

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The backbone's last n blocks: n tuples (patch tokens (B, N, D), CLS (B, D))."""
        return self.backbone.get_intermediate_layers(x, n)

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, C, H, W) or (B, H, W) -> float32 (B, in_chans, image_size, image_size): the
        centre crop at crop_ratio (``dinoflow.data.transforms.resize_center_crop``)."""
        from dinoflow.evaluation.features import preprocess

        x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.dtype != torch.uint8:
            raise TypeError(f"preprocess takes uint8 images, got {x.dtype}")
        return preprocess(x, self.image_size, self.mean, self.std, self.in_chans, self.crop_ratio)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 images -> CLS embeddings (B, D), in eval mode."""
        device = next(self.parameters()).device
        return self(self.preprocess(images).to(device))

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> RegisteredBackbone:
        """From pretrain_summary.json: the teacher backbone file (``dinoflow.artifacts.load_model``)
        and its mean/std/size/channels."""
        from dinoflow.artifacts import load_model

        path = summary.get("teacher_backbone")
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"pretrain_summary.teacher_backbone: {path!r} does not exist "
                "(run the pretrain pipeline first)"
            )
        backbone = load_model(path, key="pretrain_summary.teacher_backbone").backbone
        return cls(backbone, summary["mean"], summary["std"], summary["image_size"],
                   summary.get("channels"))  # fmt: skip


def _example_input(model: RegisteredBackbone, batch: int) -> np.ndarray:
    """A fixed, normalised-looking input (batch, C, S, S) float32 for the signature/example."""
    rng = np.random.default_rng(0)
    s = model.image_size
    return rng.standard_normal((batch, model.in_chans, s, s)).astype(np.float32)


def _signature(model: RegisteredBackbone):
    """Tensor signature with a free batch and free H, W (multiples of the patch size).

    Unnamed specs: a named one makes the serving input a dict, which the PyTorch flavor rejects.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.in_chans, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.embed_dim))]),
    )


def _requirements() -> list[str]:
    from dinoflow.serving import pinned_requirements

    return pinned_requirements()


def log_and_register(
    model: RegisteredBackbone,
    model_name: str = MODEL_NAME,
    tags: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    input_example_batch: int = 2,
    log_code: bool = True,
):
    """Log ``model`` to the active MLflow run (artifact ``backbone``) and register it.

    Returns the ``ModelVersion`` (its ``version`` is a string); ``tags`` go on the version.
    Needs an active run (``mlflow.start_run`` or kedro-mlflow's).
    """
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_and_register needs an active MLflow run")
    model = model.eval()
    example = _example_input(model, input_example_batch)
    code_paths = [str(Path(__file__).resolve().parent)] if log_code else None
    info = mlflow.pytorch.log_model(
        model,
        name="backbone",
        serialization_format="pickle",
        signature=_signature(model),
        input_example=example,
        pip_requirements=_requirements(),
        code_paths=code_paths,
        metadata={
            "dinoflow": {
                "mean": list(model.mean), "std": list(model.std), "image_size": model.image_size,
                "crop_ratio": model.crop_ratio, "in_chans": model.in_chans,
                "patch_size": model.patch_size, "embed_dim": model.embed_dim,
                "preprocessing": model.preprocessing,
                **(metadata or {}),
            }
        },
    )  # fmt: skip
    version = mlflow.register_model(
        info.model_uri, model_name, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    log.info("registered %s version %s (%s)", model_name, version.version, info.model_uri)
    return version


def _alias_version(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def promote(
    version: str | int,
    metric_value: float,
    data_id: str,
    model_name: str = MODEL_NAME,
    min_improvement: float = 0.0,
    client=None,
    metric_name: str = "knn_top1",
) -> dict[str, Any]:
    """Give ``version`` the alias champion if it beats the champion on the same data, else challenger.

    ``metric_value`` (the metrics.json key ``metric_name``; better = higher, or lower for
    alignment and uniformity: ``metric_spec.direction``) and ``data_id`` (``eval_data_id``) are
    stored as tags of the version; the champion's are read from its tags ("dinoflow.<metric_name>":
    a champion promoted on another metric has none, and stays). Returns the decision:
    {version, alias, promoted, metric, metric_name, champion_metric, champion_version,
    eval_data_id, champion_eval_data_id, reason}. A champion measured on other data is not
    comparable: the new version then stays challenger (re-evaluate the champion, or move the
    alias by hand).
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    version = str(version)
    metric_value = float(metric_value)
    if not math.isfinite(metric_value):
        raise ValueError(f"promote: metric value {metric_value} is not finite")
    tag_metric = f"dinoflow.{metric_name}"
    client.set_model_version_tag(model_name, version, tag_metric, repr(metric_value))
    client.set_model_version_tag(model_name, version, TAG_PROMOTION_METRIC, metric_name)
    client.set_model_version_tag(model_name, version, TAG_EVAL_DATA, data_id)
    champ = _alias_version(client, model_name, CHAMPION)
    if champ is not None and str(champ.version) != version:  # given back if this one is undone
        client.set_model_version_tag(model_name, version, TAG_PREVIOUS_CHAMPION, str(champ.version))
    champ_metric: float | None = None
    champ_data: str | None = None
    if champ is not None and str(champ.version) != version:
        raw = champ.tags.get(tag_metric)
        champ_metric = float(raw) if raw is not None else None
        champ_data = champ.tags.get(TAG_EVAL_DATA)
    if champ is None:
        promoted, reason = True, "no champion yet"
    elif str(champ.version) == version:
        promoted, reason = True, "already the champion"
    elif champ_metric is None:
        promoted, reason = False, f"champion v{champ.version} has no recorded {tag_metric}"
    elif champ_data != data_id:
        promoted = False
        reason = (f"not comparable: champion v{champ.version} was evaluated on other data "
                  f"({champ_data} != {data_id})")  # fmt: skip
    else:
        promoted, reason = _compare(metric_name, metric_value, champ_metric, min_improvement,
                                    champ.version)  # fmt: skip
    alias = CHAMPION if promoted else CHALLENGER
    client.set_registered_model_alias(model_name, alias, version)
    decision = {
        "model_name": model_name,
        "version": version,
        "alias": alias,
        "promoted": promoted,
        "metric": metric_value,
        "metric_name": metric_name,
        "champion_metric": champ_metric,
        "champion_version": None if champ is None else str(champ.version),
        "eval_data_id": data_id,
        "champion_eval_data_id": champ_data,
        "reason": reason,
    }
    client.set_model_version_tag(model_name, version, TAG_DECISION, f"{alias}: {reason}")
    log.info("%s v%s -> %s (%s)", model_name, version, alias, reason)
    return decision


def _compare(
    metric_name: str, new: float, old: float, min_improvement: float, champion: Any
) -> tuple[bool, str]:
    """(promoted, reason): does ``new`` beat the champion's ``old`` by more than min_improvement,
    in the metric's direction?"""
    margin = f" + {min_improvement}" if min_improvement else ""
    if direction(metric_name) == "higher":
        if new > old + min_improvement:
            return True, f"beats champion v{champion}: {new:.4f} > {old:.4f}{margin}"
        return False, f"does not beat champion v{champion}: {new:.4f} <= {old:.4f}{margin}"
    margin = f" - {min_improvement}" if min_improvement else ""
    if new < old - min_improvement:
        return True, f"beats champion v{champion}: {metric_name} {new:.4f} < {old:.4f}{margin}"
    return False, (f"does not beat champion v{champion}: {metric_name} {new:.4f} >= "
                   f"{old:.4f}{margin}")  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


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
    v = decision["version"]
    data = summary.get("data") or {}
    lines = [
        f"# {model_name} v{v}",
        "",
        f"**Alias:** `{decision['alias']}` ({decision['reason']}).",
        "",
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
        *([f"Serve (image files in, embeddings out): `mlflow models serve -m "
           f"models:/{embedder_name}@{decision['alias']} --env-manager local -h 127.0.0.1` "
           f"(`{embedder_name}`: the same weights, alias `{decision['alias']}`).", ""]
          if embedder_name else []),
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
        "## Architecture",
        "| key | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(val)} |" for k, val in backbone_kwargs.items()),
        "",
        "## Training",
        f"- steps: {summary.get('steps')}, images/s: {_fmt(summary.get('images_per_second'))}",
        *(f"- final {k}: {_fmt(val)}" for k, val in (summary.get("final") or {}).items()
          if k.startswith("loss/")),
        "",
        "## Metrics",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {val:.4f} |" for k, val in sorted(metrics.items())
          if isinstance(val, int | float) and not isinstance(val, bool)),
        "",
        "## Promotion",
        f"- metric: {decision.get('metric_why') or decision.get('metric_name', 'knn_top1')}",
        f"- this version: {decision['metric']:.4f}; champion before: "
        + ("none" if decision.get("champion_metric") is None
           else f"{decision['champion_metric']:.4f} (v{decision['champion_version']})"),
        "",
    ]  # fmt: skip
    if pictures:
        lines += ["## Pictures", *(f"![{Path(p).stem}]({p})" for p in pictures), ""]
    return "\n".join(lines)


@contextlib.contextmanager
def _active_run(experiment: str = EXPERIMENT) -> Iterator[Any]:
    """The active run, or a new one in ``experiment`` (closed on exit)."""
    import mlflow

    from dinoflow.tracking import use_experiment

    run = mlflow.active_run()
    if run is not None:
        yield run
        return
    use_experiment(experiment)
    with mlflow.start_run(run_name="registration") as run:
        # which process owns it: a later run ends it as KILLED if this one dies
        mlflow.set_tags({"dinoflow.pid": str(os.getpid()), "dinoflow.host": socket.gethostname()})
        yield run


# --------------------------------------------------------------------------- atomic registration
def weights_sha256(model: RegisteredBackbone) -> str:
    """A hash of what the registered model computes: every tensor of the backbone (by name) and
    the preprocessing. The same weights registered twice give the same hash (the default
    crop_ratio adds nothing: versions registered before it existed keep their hash)."""
    preprocessing = [model.mean, model.std, model.image_size, model.in_chans]
    if model.crop_ratio != DEFAULT_CROP_RATIO:
        preprocessing.append(model.crop_ratio)
    digest = hashlib.sha256(json.dumps(preprocessing).encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def registry_lock() -> Iterator[None]:
    """One registration at a time per SQLite store: a lock file beside the database (another
    kind of store serialises on its own side)."""
    import mlflow

    uri = mlflow.get_registry_uri() or mlflow.get_tracking_uri()
    if not str(uri).startswith("sqlite:///"):
        yield
        return
    from dinoflow.files import FolderLock

    db = Path(str(uri).removeprefix("sqlite:///"))
    with FolderLock(db.parent, "registration", name=f".{db.name}.registration.lock"):
        yield


def repair_half_made_versions(client, model_name: str) -> list[str]:
    """Versions a killed registration left without their decision: removed, and the champion
    alias they may have taken given back. Returns the versions removed."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return []
    removed = []
    champion = _alias_version(client, model_name, CHAMPION)
    for v in versions:
        if v.tags.get(TAG_STARTED) != "true" or v.tags.get(TAG_COMPLETE) == "true":
            continue  # complete, or registered before these tags existed
        previous = v.tags.get(TAG_PREVIOUS_CHAMPION)
        if champion is not None and str(champion.version) == str(v.version):
            if previous:
                client.set_registered_model_alias(model_name, CHAMPION, previous)
            else:
                client.delete_registered_model_alias(model_name, CHAMPION)
        client.delete_model_version(model_name, v.version)
        removed.append(str(v.version))
    if removed:
        log.warning("registration: removed %s version(s) %s left unfinished by a killed "
                    "registration", model_name, ", ".join(removed))
    return removed


def registered_with_weights(client, model_name: str, sha: str):
    """The complete version of ``model_name`` that holds exactly these weights, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{model_name}' and tag.`{TAG_WEIGHTS}` = '{sha}'")
    except MlflowException:
        return None
    complete = [v for v in found if v.tags.get(TAG_COMPLETE) == "true"]
    return max(complete, key=lambda v: int(v.version)) if complete else None


def _already_registered(client, version, cfg: RegistrationConfig) -> dict[str, Any]:
    """The decision of an existing version with the same weights: nothing new is made."""
    aliases = [a for a in (CHAMPION, CHALLENGER)
               if (held := _alias_version(client, cfg.model_name, a)) is not None
               and str(held.version) == str(version.version)]
    metric_name = version.tags.get("dinoflow.promotion_metric", "knn_top1")
    metric = float(version.tags.get(f"dinoflow.{metric_name}", "nan"))
    return {"model_name": cfg.model_name, "version": str(version.version),
            "alias": aliases[0] if aliases else "", "promoted": False, "metric": metric,
            "metric_name": metric_name, "eval_data_id": version.tags.get(TAG_EVAL_DATA),
            "reason": f"already registered as v{version.version} (the same weights): no new version",
            "model_uri": f"models:/{cfg.model_name}/{version.version}",
            "lineage": {k.removeprefix("dinoflow."): v for k, v in version.tags.items()
                        if k.endswith("_run_id") or k in ("dinoflow.curated_data_md5",
                                                          "dinoflow.git_commit")}}


def _run_tags(client, run_id: str | None) -> dict[str, str]:
    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.tags)
    except Exception:  # noqa: BLE001 - a run from another tracking store: lineage says unknown
        log.warning("registration: run %s not found in this tracking store", run_id)
        return {}


def _pictures(
    summary: Mapping[str, Any], report: Mapping[str, Any], patterns: Sequence[str]
) -> list[Path]:
    """Training curves (pretrain run dir), the evaluation report's PNGs, files matching ``patterns``."""
    found: list[Path] = []
    run_dir = summary.get("run_dir")
    if run_dir:
        found.append(Path(run_dir) / "training_curves.png")
    found += [Path(p) for p in (report.get("files") or {}).values() if str(p).endswith(".png")]
    for pattern in patterns:
        found += sorted(Path(".").glob(pattern))
    unique: dict[str, Path] = {}
    for p in found:
        if p.is_file():
            unique.setdefault(p.name, p)  # the card refers to pictures by file name
    return list(unique.values())


def _evaluation_run(client, run_id: str, pretrain_run_id: str | None, data_id: str) -> str | None:
    """The latest evaluation run of this pretrain run on this data (when no file names it).

    In a single ``kedro run`` of the default pipeline (or of evaluation + registration) the
    evaluation ran in this same run: it is found too (only an evaluation tags a run with
    ``dinoflow.eval_data_id``; registration never does).
    """
    if not pretrain_run_id:
        return None
    if pretrain_run_id == run_id:
        return run_id
    try:
        experiment = client.get_run(run_id).info.experiment_id
        runs = client.search_runs(
            [experiment],
            filter_string=(f"tags.`dinoflow.pretrain_run_id` = '{pretrain_run_id}' and "
                           f"tags.`dinoflow.eval_data_id` = '{data_id}'"),
            order_by=["attributes.start_time DESC"], max_results=5,
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - lineage is best effort; the decision does not need it
        return None
    return runs[0].info.run_id if runs else None


def _register_embedder(version, model: RegisteredBackbone, cfg: RegistrationConfig,
                       tags: Mapping[str, str]) -> dict[str, Any]:
    """``dinoflow-embedder`` over the backbone ``version`` just promoted, with its aliases."""
    from dinoflow.serving import register_embedder

    return register_embedder(version, model, cfg.model_name, cfg.embedder_name, tags=tags,
                             log_code=cfg.log_code)  # fmt: skip


def _lineage(client, run_id: str, summary: Mapping[str, Any], metrics: Mapping[str, Any],
             report: Mapping[str, Any], data_id: str, git_commit: str) -> dict[str, Any]:
    """Where the version came from: its runs, data hash, code, env and config fingerprint."""
    own_tags = _run_tags(client, run_id)
    pretrain_tags = _run_tags(client, summary.get("mlflow_run_id"))
    return {
        "pretrain_run_id": summary.get("mlflow_run_id"),
        "evaluation_run_id": metrics.get("mlflow_run_id") or report.get("mlflow_run_id")
        or _evaluation_run(client, run_id, summary.get("mlflow_run_id"), data_id),
        "registration_run_id": run_id,
        "curated_data_md5": pretrain_tags.get("dinoflow.curated_data_md5", "unknown"),
        "pretrain_git_commit": pretrain_tags.get("dinoflow.git_commit", "unknown"),
        "git_commit": git_commit,
        "kedro_env": own_tags.get("dinoflow.env", pretrain_tags.get("dinoflow.env", "unknown")),
        "fingerprint": summary.get("fingerprint", ""),
    }


def _attach_card(client, cfg: RegistrationConfig, version: str, decision: Mapping[str, Any],
                 summary: Mapping[str, Any], metrics: Mapping[str, Any],
                 report: Mapping[str, Any], lineage: Mapping[str, Any],
                 model: RegisteredBackbone, card_extra: str = "") -> None:
    """The model card (``card_extra`` appended): logged with its pictures on the run and as the
    version's description."""
    import mlflow

    pictures = _pictures(summary, report, cfg.pictures)
    card = model_card(cfg.model_name, decision, summary, metrics, lineage,
                      model.backbone.backbone_kwargs(), [p.name for p in pictures],
                      cfg.embedder_name) + card_extra  # fmt: skip
    for p in pictures:
        mlflow.log_artifact(str(p), artifact_path="model_card")
    mlflow.log_text(card, "model_card/model_card.md")
    description = card
    if len(description) > MAX_DESCRIPTION:
        description = card[:MAX_DESCRIPTION] + "\n\n(truncated: model_card/model_card.md)"
    client.update_model_version(cfg.model_name, version, description=description)


def _registered_model(
    summary: Mapping[str, Any], report: Mapping[str, Any], backbone: nn.Module | None
) -> RegisteredBackbone:
    """The backbone with the preprocessing its metrics were measured with: the evaluation's crop
    size and crop ratio (evaluation_report.json), else the training size and the default ratio."""
    if backbone is None:
        backbone = RegisteredBackbone.from_summary(summary).backbone
    return RegisteredBackbone(
        backbone.eval(),
        summary["mean"],
        summary["std"],
        report.get("image_size") or summary["image_size"],
        summary.get("channels"),
        crop_ratio=report.get("crop_ratio") or DEFAULT_CROP_RATIO,
    )


def register_pretrained(
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    cfg: RegistrationConfig | None = None,
    git_commit: str = "unknown",
    report: Mapping[str, Any] | None = None,
    backbone: nn.Module | None = None,
    labelled: bool | None = None,
    extra_tags: Mapping[str, str] | None = None,
    card_extra: str = "",
) -> dict[str, Any]:
    """The registration job: log + register the teacher backbone, promote it, attach the card.

    ``extra_tags`` go on the version and the run (a distilled student: its teacher's version and
    run); ``card_extra`` is markdown appended to the model card.

    summary: pretrain_summary.json (teacher_backbone, mean, std, image_size, channels,
    mlflow_run_id, fingerprint, data, n_train_images, ...). metrics: metrics.json
    (the promotion metric; optional ``eval_data_id``, ``mlflow_run_id``). report:
    evaluation_report.json (``eval_data_id``, ``files``, ``labelled``, optional ``mlflow_run_id``),
    read where metrics lacks a key. labelled: whether the data has labels (for
    ``registration.metric: auto``; default: the report's ``labelled``, else whether metrics.json
    holds knn_top1). Runs in the active MLflow run or a new one. Returns the registration summary
    (version, alias, metric name and why, both numbers, reason, lineage).
    """
    import mlflow
    from mlflow import MlflowClient

    summary = summary.model_dump(mode="json") if hasattr(summary, "model_dump") else summary
    report = report.model_dump(mode="json") if hasattr(report, "model_dump") else report
    cfg = cfg or RegistrationConfig()
    report = report or {}
    if labelled is None:
        labelled = bool(report.get("labelled", AUTO_LABELLED_METRIC in metrics))
    metric = resolve_registration_metric(cfg.metric, labelled)
    if metric not in metrics:
        raise ConfigError(
            f"registration.metric: {metric!r} is not in metrics.json "
            f"(keys: {sorted(metrics)}); run the evaluation pipeline first"
        )
    value = float(metrics[metric])
    why = _why(metric, cfg.metric, labelled)
    log.info("registration: promotion metric %s", why)
    data_id = metrics.get("eval_data_id") or report.get("eval_data_id")
    if not data_id:
        # older metrics files: the data config fixes the splits for a given source
        data_id = "data:" + data_identity([json.dumps(summary.get("data"), sort_keys=True)])
        log.warning("no eval_data_id in metrics or report: using %s (from the data config)", data_id)
    model = _registered_model(summary, report, backbone)
    client = MlflowClient()
    with registry_lock(), _active_run() as run:
        repair_half_made_versions(client, cfg.model_name)
        if cfg.embedder_name:
            from dinoflow.serving import remove_orphan_embedders

            remove_orphan_embedders(cfg.model_name, cfg.embedder_name, client)
        sha = weights_sha256(model)
        existing = registered_with_weights(client, cfg.model_name, sha)
        if existing is not None:
            result = _already_registered(client, existing, cfg)
            log.info("%s: %s", cfg.model_name, result["reason"])
            mlflow.set_tags({"dinoflow.registered_version": f"{cfg.model_name}/{existing.version}",
                             "dinoflow.registration_decision": "unchanged"})
            return result
        run_id = run.info.run_id
        lineage = _lineage(client, run_id, summary, metrics, report, data_id, git_commit)
        known = {f"dinoflow.{k}": str(v) for k, v in lineage.items() if v not in (None, "")}
        known.update({k: str(v) for k, v in (extra_tags or {}).items()})
        parents = ("dinoflow.pretrain_run_id", "dinoflow.evaluation_run_id")
        mlflow.set_tags({k: v for k, v in known.items() if k in parents or k in (extra_tags or {})})
        version = log_and_register(
            model, cfg.model_name, tags={**known, TAG_STARTED: "true", TAG_WEIGHTS: sha},
            metadata={"fingerprint": summary.get("fingerprint", "")},
            input_example_batch=cfg.input_example_batch, log_code=cfg.log_code,
        )  # fmt: skip
        mlflow.set_tag(TAG_PROMOTION_METRIC, metric)
        decision = promote(version.version, value, data_id, cfg.model_name, cfg.min_improvement,
                           client, metric_name=metric)  # fmt: skip
        decision["metric_why"] = why
        _attach_card(client, cfg, version.version, decision, summary, metrics, report, lineage,
                     model, card_extra)
        numbers = {"registration/metric": value, "registration/promoted": float(decision["promoted"]),
                   "registration/version": float(version.version)}  # fmt: skip
        if decision["champion_metric"] is not None:
            numbers["registration/champion_metric"] = decision["champion_metric"]
        mlflow.log_metrics(numbers)
        mlflow.set_tags({"dinoflow.registered_version": f"{cfg.model_name}/{version.version}",
                         "dinoflow.registration_decision": decision["alias"]})  # fmt: skip
        result = {**decision, "metric_name": metric,
                  "model_uri": f"models:/{cfg.model_name}/{version.version}",
                  "lineage": lineage}  # fmt: skip
        if cfg.embedder_name:
            result["embedder"] = _register_embedder(version, model, cfg, known)
        mlflow.log_dict(result, "registration/decision.json")
        client.set_model_version_tag(cfg.model_name, version.version, TAG_COMPLETE, "true")
    return result
