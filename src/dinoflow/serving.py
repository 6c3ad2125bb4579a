"""The embedding service: ``dinoflow-embedder``, an MLflow pyfunc over a registered backbone.

Input: a DataFrame with a column ``image`` of base64-encoded image files (PNG, JPEG, anything
Pillow opens; grey or RGB). Each is decoded by the project's one decoder
(``dinoflow.data.decode.decode_image``, as curation decodes) to the backbone's channels, then
cropped and normalised as evaluation does (``RegisteredBackbone.preprocess`` ->
``dinoflow.data.transforms.preprocess``: the shorter side resized to round(image_size /
crop_ratio), the centre image_size square kept, so a wide photo is not squashed). Output: one
embedding per row, float32:

- ``embedding="cls"`` (default): the CLS token after the final norm, (B, D), what ``forward`` gives;
- ``embedding="patch_mean"``: the mean of the patch tokens, (B, D);
- ``embedding="patches"``: the patch tokens, (B, N, D), N = (S / patch_size)^2.

``embedding`` and ``batch_size`` are MLflow inference params (in the signature's param schema):
``model.predict(df, params={"embedding": "patches"})`` in process, or ``"params": {...}`` next to
``"dataframe_split"`` in the JSON posted to ``/invocations`` of
``mlflow models serve -m models:/dinoflow-embedder@champion --env-manager local -h 127.0.0.1``.

The pyfunc holds no weights of its own: its artifact ``backbone`` is the registered backbone
version's logged model (copied into the embedder at logging time), loaded in ``load_context``
with ``mlflow.pytorch.load_model``. Each embedder version is tagged with the backbone version it
wraps (``dinoflow.backbone_version``), and ``sync_embedder_aliases`` gives every alias of
``dinoflow-backbone`` (champion, challenger) to the embedder version over the same backbone
version, so the two aliases move together.

Why not kedro-mlflow's ``pipeline_ml_factory``: it bundles a Kedro *inference pipeline* with the
artifacts of a training pipeline and logs it as a ``KedroPipelineModel`` after the pipeline
run. Here it does not fit: (1) the preprocessing is library code (one decoder, one resize and
normalisation) that the backbone already carries, not a chain of Kedro nodes and catalog
entries; (2) the model is logged and registered *inside* the registration node, next to the
backbone version whose promotion decision it must share, while ``pipeline_ml_factory`` logs at
``after_pipeline_run``, unregistered and without aliases; (3) serving a ``KedroPipelineModel``
needs Kedro, kedro-mlflow and the project's catalog in the serving environment and runs a Kedro
runner per request; (4) a ``PipelineML`` added to other pipelines (our ``__default__`` is
curation + pretrain + evaluation + registration) is demoted to a plain ``Pipeline`` and then
logs nothing (kedro-mlflow issue 690); (5) its released ``KedroPipelineModel.predict`` has no
type hints, so MLflow cannot validate its input (the warning every ``kedro`` command printed, until
``dinoflow.pipelines.hooks.import_kedro_mlflow_models`` supplied the hint).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDER_NAME",
    "EMBEDDINGS",
    "DinoflowEmbedder",
    "embed_images",
    "encode_image",
    "example_input",
    "load_registered_backbone",
    "log_and_register_embedder",
    "move_alias",
    "preprocess_images",
    "register_embedder",
    "sync_embedder_aliases",
]

EMBEDDER_NAME = "dinoflow-embedder"
EMBEDDINGS = ("cls", "patch_mean", "patches")
IMAGE_COLUMN = "image"
DEFAULT_BATCH_SIZE = 64
TAG_BACKBONE_VERSION = "dinoflow.backbone_version"  # on embedder versions
TAG_BACKBONE_MODEL = "dinoflow.backbone_model"


def encode_image(source: str | Path | bytes) -> str:
    """An image file (path) or its bytes -> base64 text: one cell of the ``image`` column."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return base64.b64encode(data).decode("ascii")


def load_registered_backbone(uri: str) -> torch.nn.Module:
    """A registered or logged backbone (``models:/name@alias``, ``models:/name/3``, ``runs:/``)
    as the RegisteredBackbone it was logged as, on the CPU, in eval mode
    (``dinoflow.artifacts.load_model``; a ModelLoadError is a ValueError)."""
    from dinoflow.artifacts import is_mlflow_uri, load_model

    if not is_mlflow_uri(uri):
        raise ValueError(
            f"model: {uri!r} is not an MLflow model URI (models:/dinoflow-backbone@"
            "champion, models:/dinoflow-backbone/3 or runs:/<run id>/backbone)"
        )
    model = load_model(uri, key="model").registered
    if model is None:
        raise ValueError(
            f"model: {uri} is not a dinoflow backbone (no preprocess / forward_patches)"
        )
    return model.eval()


def _decode_cell(value: Any, row: int) -> bytes:
    """One ``image`` cell (base64 text, or raw bytes in process) -> the encoded file bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"image row {row}: expected base64 text, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URI: data:image/png;base64,<text>
        value = value.split(",", 1)[1]
    try:  # line breaks (as the `base64` tool wraps its output) are not part of the data
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image row {row}: not valid base64 ({exc})") from None


def preprocess_images(
    model: torch.nn.Module, images: Sequence[str | Path | bytes], names: Sequence[str] | None = None
) -> torch.Tensor:
    """Image files (paths) or encoded file bytes -> float32 (B, in_chans, S, S), as evaluation.

    ``model`` is a RegisteredBackbone (in_chans, preprocess). Each image is decoded to the
    model's channels and preprocessed on its own (sizes may differ: each becomes the model's
    centre crop, ``dinoflow.data.transforms.resize_center_crop``), then stacked.
    ``names`` label the images in errors (default: "image row i" / the path).
    """
    from dinoflow.data.decode import decode_image

    out = []
    for i, image in enumerate(images):
        try:
            decoded = decode_image(image, int(model.in_chans))
        except ValueError as exc:
            label = names[i] if names is not None else f"image row {i}"
            raise ValueError(f"{label}: {exc}") from None
        out.append(model.preprocess(decoded.unsqueeze(0)))
    if not out:
        s = int(model.image_size)
        return torch.empty(0, int(model.in_chans), s, s)
    return torch.cat(out)


@torch.inference_mode()
def embed_images(
    model: torch.nn.Module,
    x: torch.Tensor,
    embedding: str = "cls",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Preprocessed x (B, C, S, S) -> float32 (B, D) for cls / patch_mean, (B, N, D) for patches."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        if embedding == "cls":
            y = model(xb)
        else:
            y = model.forward_patches(xb)
            if embedding == "patch_mean":
                y = y.mean(dim=1)
        chunks.append(y.float().cpu())
    if not chunks:
        d = int(model.embed_dim)
        return np.zeros((0, d), dtype=np.float32)
    return torch.cat(chunks).numpy()


def _bad_request(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400 when served


class DinoflowEmbedder(PythonModel):
    """pyfunc: DataFrame column ``image`` (base64 image files) -> embeddings (see module doc)."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    def load_context(self, context) -> None:
        """Load the wrapped backbone (artifact ``backbone``: an MLflow PyTorch model)."""
        self.model = mlflow.pytorch.load_model(context.artifacts["backbone"], map_location="cpu")
        self.model.eval()

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """model_input: DataFrame with column ``image`` (B rows) -> float32 (B, D) or (B, N, D).

        params: ``embedding`` (cls | patch_mean | patches, default cls), ``batch_size``.
        """
        if self.model is None:
            raise RuntimeError("DinoflowEmbedder: no backbone loaded (load it with mlflow.pyfunc)")
        params = dict(params or {})
        embedding = str(params.get("embedding") or "cls")
        batch_size = int(params.get("batch_size") or DEFAULT_BATCH_SIZE)
        if embedding not in EMBEDDINGS:
            raise _bad_request(
                f"params.embedding: must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}"
            )
        if batch_size < 1:
            raise _bad_request(f"params.batch_size: must be >= 1, got {batch_size}")
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            found = (
                list(model_input.columns)
                if isinstance(model_input, pd.DataFrame)
                else type(model_input).__name__
            )
            raise _bad_request(
                f"input: expected a DataFrame with a column {IMAGE_COLUMN!r} of "
                f"base64-encoded image files, got {found}"
            )
        try:
            files = [_decode_cell(v, i) for i, v in enumerate(model_input[IMAGE_COLUMN].tolist())]
            x = preprocess_images(self.model, files)
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        return embed_images(self.model, x, embedding, batch_size)


def example_input() -> pd.DataFrame:
    """Two real image files made in memory: a grey 20x24 PNG and an RGB 30x26 JPEG (base64)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8), mode="L")
    rgb = Image.fromarray(rng.integers(0, 256, (26, 30, 3), dtype=np.uint8), mode="RGB")
    cells = []
    for image, fmt in ((grey, "PNG"), (rgb, "JPEG")):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        cells.append(encode_image(buf.getvalue()))
    return pd.DataFrame({IMAGE_COLUMN: cells})


def _signature(model: torch.nn.Module):
    """Input: string column ``image``; output: float32 (B, D) (the default ``cls``); params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(model.embed_dim)))]),
        params=ParamSchema(
            [
                ParamSpec("embedding", DataType.string, "cls"),
                ParamSpec("batch_size", DataType.long, DEFAULT_BATCH_SIZE),
            ]
        ),
    )


BACKBONE_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pydantic")


def pinned_requirements(packages: tuple[str, ...] = BACKBONE_PACKAGES) -> list[str]:
    """Pinned to the versions that made the model: inference would be slow (a subprocess)."""
    from importlib.metadata import version

    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except Exception:  # noqa: BLE001 - not installed as a distribution: leave it unpinned
            reqs.append(pkg)
    return reqs


def _requirements() -> list[str]:
    return pinned_requirements((*BACKBONE_PACKAGES, "pillow", "pandas", "mlflow"))


def log_and_register_embedder(
    backbone_uri: str,
    model: torch.nn.Module,
    backbone_version: str | int,
    embedder_name: str = EMBEDDER_NAME,
    backbone_name: str = "dinoflow-backbone",
    tags: Mapping[str, Any] | None = None,
    log_code: bool = True,
):
    """Log the embedder over ``backbone_uri`` to the active run (artifact ``embedder``), register it.

    ``model`` is the RegisteredBackbone behind ``backbone_uri`` (for the signature). The version
    is tagged with the backbone version it wraps. Returns the embedder ``ModelVersion``.
    """
    from mlflow import MlflowClient

    if mlflow.active_run() is None:
        raise RuntimeError("log_and_register_embedder needs an active MLflow run")
    code_paths = [str(Path(__file__).resolve().parent)] if log_code else None
    info = mlflow.pyfunc.log_model(
        name="embedder",
        python_model=DinoflowEmbedder(),
        artifacts={"backbone": backbone_uri},
        signature=_signature(model),
        input_example=example_input(),
        pip_requirements=_requirements(),
        code_paths=code_paths,
        metadata={
            "dinoflow": {
                "backbone": f"{backbone_name}/{backbone_version}",
                "embeddings": list(EMBEDDINGS),
                "input_column": IMAGE_COLUMN,
            }
        },
    )
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    version_tags.update(
        {TAG_BACKBONE_VERSION: str(backbone_version), TAG_BACKBONE_MODEL: backbone_name}
    )
    version = mlflow.register_model(info.model_uri, embedder_name, tags=version_tags)
    MlflowClient().update_model_version(
        embedder_name,
        version.version,
        description=(
            f"Embedding service over {backbone_name} v{backbone_version} (same aliases).\n"
            f"Input: DataFrame column `{IMAGE_COLUMN}` of base64-encoded image files; "
            "output: one embedding per row (params: embedding = cls | patch_mean | "
            "patches, batch_size).\n`mlflow models serve -m "
            f"models:/{embedder_name}@champion --env-manager local -h 127.0.0.1`"
        ),
    )
    log.info(
        "registered %s version %s over %s v%s",
        embedder_name,
        version.version,
        backbone_name,
        backbone_version,
    )
    return version


def sync_embedder_aliases(
    backbone_name: str = "dinoflow-backbone", embedder_name: str = EMBEDDER_NAME, client=None
) -> dict[str, str]:
    """Give each alias of the backbone model to the embedder version over the same backbone version.

    An embedder alias whose backbone alias is gone, or whose backbone version has no embedder,
    is removed (it would serve another model than the backbone alias names). Returns
    {alias: embedder version} as set. Run it after moving a backbone alias by hand (or use
    ``move_alias``).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        embedder = client.get_registered_model(embedder_name)
    except MlflowException:
        return {}
    backbone_aliases = {
        a: str(v) for a, v in client.get_registered_model(backbone_name).aliases.items()
    }
    by_backbone: dict[str, str] = {}
    for mv in client.search_model_versions(f"name = '{embedder_name}'"):
        wrapped = mv.tags.get(TAG_BACKBONE_VERSION)
        if wrapped is not None and int(mv.version) > int(by_backbone.get(wrapped, 0)):
            by_backbone[wrapped] = str(mv.version)  # the newest embedder of that backbone version
    current = {a: str(v) for a, v in embedder.aliases.items()}
    synced: dict[str, str] = {}
    for alias, backbone_version in backbone_aliases.items():
        target = by_backbone.get(backbone_version)
        if target is None:
            if alias in current:
                client.delete_registered_model_alias(embedder_name, alias)
            continue
        if current.get(alias) != target:
            client.set_registered_model_alias(embedder_name, alias, target)
        synced[alias] = target
    for alias in set(current) - set(backbone_aliases):
        client.delete_registered_model_alias(embedder_name, alias)
    return synced


def remove_orphan_embedders(
    backbone_name: str = "dinoflow-backbone", embedder_name: str = EMBEDDER_NAME, client=None
) -> list[str]:
    """Embedder versions over a backbone version that no longer exists (a half-made backbone
    version removed by ``registry.repair_half_made_versions``): removed, aliases re-synced."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        embedders = client.search_model_versions(f"name = '{embedder_name}'")
        backbones = {
            str(v.version) for v in client.search_model_versions(f"name = '{backbone_name}'")
        }
    except MlflowException:
        return []
    removed = []
    for mv in embedders:
        if mv.tags.get(TAG_BACKBONE_VERSION) not in backbones:
            client.delete_model_version(embedder_name, mv.version)
            removed.append(str(mv.version))
    if removed:
        sync_embedder_aliases(backbone_name, embedder_name, client)
    return removed


def move_alias(
    alias: str,
    backbone_version: str | int,
    backbone_name: str = "dinoflow-backbone",
    embedder_name: str = EMBEDDER_NAME,
    client=None,
) -> dict[str, str]:
    """Point ``alias`` of the backbone at ``backbone_version`` and the embedder's with it."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    client.set_registered_model_alias(backbone_name, alias, str(backbone_version))
    return sync_embedder_aliases(backbone_name, embedder_name, client)


def register_embedder(
    backbone_version,
    model: torch.nn.Module,
    backbone_name: str = "dinoflow-backbone",
    embedder_name: str = EMBEDDER_NAME,
    tags: Mapping[str, Any] | None = None,
    log_code: bool = True,
) -> dict[str, Any]:
    """Registration's embedder step: log + register over ``backbone_version``, then sync aliases.

    ``backbone_version``: the backbone's ``ModelVersion`` (its ``source`` is the logged model).
    Returns {"model_name", "version", "model_uri", "backbone_version", "aliases"}.
    """
    version = log_and_register_embedder(
        backbone_version.source,
        model,
        backbone_version.version,
        embedder_name,
        backbone_name,
        tags=tags,
        log_code=log_code,
    )
    synced = sync_embedder_aliases(backbone_name, embedder_name)
    aliases = sorted(a for a, v in synced.items() if v == str(version.version))
    return {
        "model_name": embedder_name,
        "version": str(version.version),
        "model_uri": f"models:/{embedder_name}/{version.version}",
        "backbone_version": str(backbone_version.version),
        "aliases": aliases,
    }
