"""One loader for every model a user can name: ``load_model(source)`` -> ``ModelArtifact``.

The sources (``SOURCE_FORMS``, the list every "cannot load" message ends with):

- ``models:/<name>/<version>`` or ``models:/<name>@<alias>``: a registered version, pinned to its
  number (``uri``), as the ``RegisteredBackbone`` it was logged as, with its preprocessing, the
  pretraining run that made it and, asked with ``find_heads``, the heads of that run (its run
  directory's ``teacher_heads.pt``, when its ``teacher_backbone.pt`` is bit for bit the version);
- ``runs:/<run id>/<path>``: a model logged to a run;
- a run directory: a pretraining run's (``teacher_backbone.pt``, ``teacher_heads.pt``,
  ``pretrain_summary.json``) or a distillation's (``student_backbone.pt``, ``student_heads.pt``,
  ``distillation_summary.json``);
- a dinoflow backbone file (``dinoflow.models.vit.save_backbone``);
- a released DINOv2 weights file (official or timm layout, read by ``dinoflow.weights``) loaded
  into the ``architecture`` the caller builds: a released file holds no architecture.

This is the one place in the library that calls ``mlflow.pytorch.load_model`` (the embedder
pyfunc's ``load_context`` aside: MLflow hands it the model's local copy). MLflow is imported only
when an MLflow source is loaded, so unpickling a registered model stays light.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dinoflow.errors import DataError
from dinoflow.models.vit import BACKBONE_FORMAT, DinoVisionTransformer, load_backbone
from dinoflow.weights import LoadReport, load_released_weights

log = logging.getLogger(__name__)

__all__ = ["SOURCE_FORMS", "ModelArtifact", "ModelLoadError", "is_mlflow_uri", "load_model"]

MLFLOW_SCHEMES = ("models:/", "runs:/")
# (backbone file, heads file, summary) of each kind of run directory, the first found wins
RUN_DIR_FILES = (
    ("teacher_backbone.pt", "teacher_heads.pt", "pretrain_summary.json"),
    ("student_backbone.pt", "student_heads.pt", "distillation_summary.json"),
)
SOURCE_FORMS = (
    "models:/<name>/<version>, models:/<name>@<alias>, runs:/<run id>/<path>, a run directory "
    "(teacher_backbone.pt + pretrain_summary.json, or student_backbone.pt + "
    "distillation_summary.json), a dinoflow backbone file (save_backbone), or a released DINOv2 "
    "weights file (official or timm layout, with its architecture)"
)
TAG_PRETRAIN_RUN = "dinoflow.pretrain_run_id"  # on registered versions: the run that trained it
TAG_FINGERPRINT = "dinoflow.fingerprint"


class ModelLoadError(DataError):
    """A model that cannot be loaded: one message naming the key, the source, why, and every
    accepted form. ``kind``: what the source was recognised as (None: nothing), as
    ``ModelArtifact.kind``."""

    def __init__(
        self, key: str, source: str | os.PathLike[str], reason: str, kind: str | None = None
    ) -> None:
        super().__init__(f"{key}: cannot load {source}: {reason}\n  accepted: {SOURCE_FORMS}")
        self.key, self.source, self.reason, self.kind = key, str(source), reason, kind

    def __reduce__(self):  # pickled across processes with its own arguments
        return type(self), (self.key, self.source, self.reason, self.kind)


@dataclass
class ModelArtifact:
    """A loaded model: the backbone (on the CPU, in eval mode) and what its source says of it.

    kind: "registered" (models:/), "logged" (runs:/), "run_dir", "backbone_file" or "released".
    source: as given; uri: the source pinned (``models:/<name>/<version>`` for an alias).
    mean, std (in [0, 1] units), image_size (the centre crop), crop_ratio, channels: the
    preprocessing it was trained or registered with; None where the source does not say (a file).
    registered: the ``RegisteredBackbone`` an MLflow source holds (``preprocess``,
    ``forward_patches``, ``embed``), else None.
    heads_file: its DINO / iBOT heads (``dinoflow.methods.frozen_teacher.heads_from_state`` reads
    them); None: none, or not looked for. model_name, version: the registered version;
    run_id: the MLflow run that trained it; fingerprint: its training config's;
    load_report: what loading a released file did (``dinoflow.weights.LoadReport``).
    """

    backbone: DinoVisionTransformer
    source: str
    kind: str
    uri: str
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: int | None = None
    crop_ratio: float | None = None
    channels: int | None = None
    registered: nn.Module | None = None
    heads_file: Path | None = None
    model_name: str | None = None
    version: str | None = None
    run_id: str | None = None
    fingerprint: str | None = None
    load_report: LoadReport | None = None


def is_mlflow_uri(source: str | os.PathLike[str]) -> bool:
    """``models:/...`` or ``runs:/...``: a source MLflow resolves (no path on this machine)."""
    return str(source).startswith(MLFLOW_SCHEMES)


def load_model(
    source: str | os.PathLike[str],
    *,
    key: str = "model",
    architecture: Callable[[], DinoVisionTransformer] | None = None,
    find_heads: bool = False,
) -> ModelArtifact:
    """The model ``source`` names (any of ``SOURCE_FORMS``), on the CPU, in eval mode.

    key: the parameter that named the source, for the error message (``evaluation.model``).
    architecture: builds the backbone a released weights file is loaded into (needed only for
    one). find_heads: look for a registered version's heads in the run directory of the
    pretraining that made it (a run directory's heads are always reported).
    Raises ModelLoadError (a DataError, a ValueError) naming the source and the accepted forms.
    """
    text = str(source)
    if text.startswith("models:/"):
        return _registered(text, key, find_heads)
    if text.startswith("runs:/"):
        return _from_mlflow(text, text, key, "logged")
    path = Path(text)
    if path.is_dir():
        return _run_dir(path, text, key)
    if path.is_file():
        return _file(path, text, key, architecture)
    raise ModelLoadError(key, text, "no such file or directory (and not a models:/ or runs:/ URI)")


# --------------------------------------------------------------------------- MLflow sources
def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _registered(source: str, key: str, find_heads: bool) -> ModelArtifact:
    """``models:/name@alias`` / ``models:/name/<version>``: pinned to the version's number (a
    stage or ``latest`` is left to MLflow), with the version's lineage and, asked, its heads."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = source.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    if not sep:
        name, _, alias = ref.partition("/")
    client = MlflowClient()
    try:
        if sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, alias) if alias.isdigit() else None
    except MlflowException as exc:
        raise ModelLoadError(
            key,
            source,
            f"not in the registry at {mlflow.get_tracking_uri()} "
            f"({_first_line(exc)}); register a backbone first (kedro run)",
            "registered",
        ) from None
    uri = f"models:/{name}/{version.version}" if version is not None else source
    artifact = _from_mlflow(uri, source, key, "registered")
    artifact.model_name = name
    if version is not None:
        artifact.version = str(version.version)
        artifact.run_id = version.tags.get(TAG_PRETRAIN_RUN)
        artifact.fingerprint = version.tags.get(TAG_FINGERPRINT)
        if find_heads:
            artifact.heads_file = _heads_of_run(client, artifact.run_id, artifact.backbone)
    return artifact


def _from_mlflow(uri: str, source: str, key: str, kind: str) -> ModelArtifact:
    """A logged dinoflow model: a RegisteredBackbone (with its preprocessing) or a bare backbone."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        loaded = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError, ImportError) as exc:  # ImportError: code it pickled
        raise ModelLoadError(
            key, source, f"{_first_line(exc)} (MLflow store {mlflow.get_tracking_uri()})", kind
        ) from None
    backbone = getattr(loaded, "backbone", loaded)
    if not isinstance(backbone, DinoVisionTransformer):
        raise ModelLoadError(
            key, source, f"{uri} holds a {type(loaded).__name__}, not a dinoflow backbone", kind
        )
    loaded.eval()
    artifact = ModelArtifact(backbone, source, kind, uri)
    if all(hasattr(loaded, a) for a in ("preprocess", "forward_patches", "image_size")):
        artifact.registered = loaded
        artifact.mean, artifact.std = list(loaded.mean), list(loaded.std)
        artifact.image_size, artifact.channels = int(loaded.image_size), int(loaded.in_chans)
        artifact.crop_ratio = float(loaded.crop_ratio)
    return artifact


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _heads_of_run(client, run_id: str | None, backbone: DinoVisionTransformer) -> Path | None:
    """The teacher_heads.pt of the pretraining run ``run_id``: its run directory (the run's
    ``pretrain.train.run_dir``), if its teacher_backbone.pt is bit for bit ``backbone`` (a later
    run may have overwritten the folder)."""
    try:
        run_dir = (
            client.get_run(run_id).data.params.get("pretrain.train.run_dir") if run_id else None
        )
    except Exception:  # noqa: BLE001 - a run of another store: no heads found
        run_dir = None
    if not run_dir:
        return None
    files = Path(run_dir) / "teacher_backbone.pt", Path(run_dir) / "teacher_heads.pt"
    if all(f.is_file() for f in files) and _same_weights(load_backbone(files[0]), backbone):
        return files[1]
    log.warning("teacher heads: %s does not hold the registered backbone's heads", run_dir)
    return None


# --------------------------------------------------------------------------- files
def _backbone_file(path: Path, source: str, key: str, kind: str) -> DinoVisionTransformer:
    try:
        return load_backbone(path).eval()
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ModelLoadError(key, source, f"{path}: {_first_line(exc)}", kind) from None


def _run_dir(folder: Path, source: str, key: str) -> ModelArtifact:
    """A dinoflow run directory: its backbone, heads and summary (normalisation, run, config)."""
    found = next((names for names in RUN_DIR_FILES if (folder / names[0]).is_file()), None)
    if found is None:
        raise ModelLoadError(
            key,
            source,
            "a directory without teacher_backbone.pt or "
            "student_backbone.pt (not a dinoflow run directory)",
            "run_dir",
        )
    backbone_name, heads_name, summary_name = found
    backbone = _backbone_file(folder / backbone_name, source, key, "run_dir")
    summary_file = folder / summary_name
    try:
        s = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            key, source, f"{summary_file}: {_first_line(exc)}", "run_dir"
        ) from None
    heads = folder / heads_name
    return ModelArtifact(
        backbone,
        source,
        "run_dir",
        str(folder),
        mean=s.get("mean") or None,
        std=s.get("std") or None,
        image_size=s.get("image_size"),
        channels=s.get("channels"),
        heads_file=heads if heads.is_file() else None,
        run_id=s.get("mlflow_run_id"),
        fingerprint=s.get("fingerprint"),
    )


def _file(
    path: Path, source: str, key: str, architecture: Callable[[], DinoVisionTransformer] | None
) -> ModelArtifact:
    """A dinoflow backbone file, or a released weights file loaded into ``architecture()``."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file of another sort
        raise ModelLoadError(
            key, source, f"not a weights file torch.load reads ({_first_line(exc).split('. ')[0]})"
        ) from None
    if isinstance(raw, dict) and raw.get("format") == BACKBONE_FORMAT:
        backbone = _backbone_file(path, source, key, "backbone_file")
        return ModelArtifact(backbone, source, "backbone_file", str(path))
    del raw
    if architecture is None:
        raise ModelLoadError(
            key,
            source,
            "a released weights file (official or timm layout) holds "
            "no architecture: give the one it was trained with",
            "released",
        )
    backbone = architecture()
    try:
        report = load_released_weights(backbone, path)
    except ValueError as exc:
        raise ModelLoadError(key, source, str(exc), "released") from None
    log.info("%s from %s: %s", key, path, report.summary())
    return ModelArtifact(backbone.eval(), source, "released", str(path), load_report=report)
