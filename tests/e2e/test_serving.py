"""The embedding service ``dinoflow-embedder``: decoding, registration with the backbone's aliases,
and ``mlflow models serve`` answering real PNG and JPEG files on loopback.

Every store is a real MLflow SQLite store in tmp_path; every image a real encoded file.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.data.decode import decode_image
from dinoflow.models.vit import DinoVisionTransformer, save_backbone
from dinoflow.pipelines.datasets import ReportSet
from dinoflow.registry import CHALLENGER, CHAMPION, MODEL_NAME, RegisteredBackbone
from dinoflow.results import EvaluationReport
from dinoflow.serving import EMBEDDER_NAME, TAG_BACKBONE_VERSION, encode_image

MEAN, STD, SIZE = [0.3], [0.35], 16
ENV = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}


def _save(image: Image.Image, path: Path, fmt: str) -> Path:
    image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def image_files(root: Path) -> list[Path]:
    """Grey and RGB files, PNG and JPEG, four sizes (none square to the model's 16 px)."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    ramp = np.add.outer(np.arange(24), np.arange(20)).astype(np.uint8) * 5
    return [
        _save(Image.fromarray(ramp, "L"), root / "grey.png", "PNG"),
        _save(Image.fromarray(rng.integers(0, 256, (33, 40, 3), dtype=np.uint8), "RGB"),
              root / "rgb.png", "PNG"),
        _save(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L"),
              root / "grey.jpg", "JPEG"),
        _save(Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8), "RGB"),
              root / "rgb.jpg", "JPEG"),
    ]  # fmt: skip


def tiny_backbone(seed: int) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(img_size=SIZE, patch_size=4, in_chans=1, embed_dim=16, depth=1,
                                num_heads=2, layerscale_init=None)  # fmt: skip
    with torch.no_grad():  # away from the init, so that images give clearly different embeddings
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


def register(tmp_path: Path, name: str, seed: int, knn: float, data_id: str = "data-1") -> dict:
    """One registration, as the registration node runs it (backbone + embedder + promotion)."""
    import mlflow

    from dinoflow.pipelines.registration.nodes import register_backbone

    path = tmp_path / name / "teacher_backbone.pt"
    save_backbone(tiny_backbone(seed), path)
    summary = {"teacher_backbone": str(path), "mean": MEAN, "std": STD, "image_size": SIZE,
               "channels": 1, "mlflow_run_id": None, "fingerprint": name,
               "data": {"source": "synthetic"}, "n_train_images": 10, "steps": 1, "final": {}}  # fmt: skip
    with mlflow.start_run(run_name=f"registration {name}"):
        evaluation = ReportSet({"knn_top1": knn}, EvaluationReport(model=str(path), eval_data_id=data_id),
                               path.parent)
        return register_backbone(summary, evaluation, {"input_example_batch": 1}).model_dump()




def test_decode_image_grey_rgb_bytes_and_errors(tmp_path: Path) -> None:
    grey, rgb, grey_jpg, _ = image_files(tmp_path)
    levels = np.array(Image.open(grey))
    g = decode_image(grey, 1)
    assert g.dtype == torch.uint8 and g.shape == (1, 24, 20)
    assert torch.equal(g[0], torch.from_numpy(levels))  # grey files keep their own levels
    assert torch.equal(decode_image(grey, 3), g.expand(3, -1, -1))  # grey repeated to RGB
    c = decode_image(rgb, 3)
    assert c.shape == (3, 33, 40)
    assert torch.equal(c.permute(1, 2, 0), torch.from_numpy(np.asarray(Image.open(rgb))))
    # RGB -> luma as Pillow's "L" (what curation computes): R 299, G 587, B 114 per mille
    y = decode_image(rgb, 1)[0].double()
    expected = (c.double() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    assert (y - expected).abs().max() <= 1.0
    assert torch.equal(decode_image(grey_jpg.read_bytes(), 1), decode_image(grey_jpg, 1))
    # RGBA on white, as curation composites transparency
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except the first row
    rgba[0, :, 3] = 255
    _save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png", "PNG")
    out = decode_image(tmp_path / "rgba.png", 3)
    assert out[:, 0].tolist() == [[255] * 4, [0] * 4, [0] * 4]
    assert out[:, 1:].eq(255).all()
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        decode_image(tmp_path / "text.png", 3)
    with pytest.raises(ValueError, match="image bytes"):
        decode_image(b"\x89PNG broken", 1)


def test_embedder_aliases_follow_the_backbone(store: str, tmp_path: Path) -> None:
    """champion / challenger of dinoflow-embedder move with dinoflow-backbone's, version by version."""
    from mlflow import MlflowClient

    from dinoflow.serving import move_alias, sync_embedder_aliases

    client = MlflowClient()
    first = register(tmp_path, "a", seed=0, knn=0.5)
    assert (first["alias"], first["embedder"]["version"], first["embedder"]["aliases"]) == (
        CHAMPION, "1", [CHAMPION])  # fmt: skip
    second = register(tmp_path, "b", seed=1, knn=0.7)  # better: champion moves to v2
    assert second["alias"] == CHAMPION and second["embedder"]["aliases"] == [CHAMPION]
    third = register(tmp_path, "c", seed=2, knn=0.6)  # worse: challenger
    assert third["alias"] == CHALLENGER and third["embedder"]["aliases"] == [CHALLENGER]

    def aliases(name: str) -> dict[str, str]:
        return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}

    assert aliases(MODEL_NAME) == {CHAMPION: "2", CHALLENGER: "3"}
    assert aliases(EMBEDDER_NAME) == {CHAMPION: "2", CHALLENGER: "3"}
    for v in ("1", "2", "3"):  # each embedder version wraps the backbone version of its number
        assert client.get_model_version(EMBEDDER_NAME, v).tags[TAG_BACKBONE_VERSION] == v
    # moved by hand: both at once, or the backbone alone and then a sync
    assert move_alias(CHAMPION, "1") == {CHAMPION: "1", CHALLENGER: "3"}
    assert aliases(EMBEDDER_NAME)[CHAMPION] == "1"
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, "3")
    client.delete_registered_model_alias(MODEL_NAME, CHALLENGER)
    assert sync_embedder_aliases() == {CHAMPION: "3"}
    assert aliases(EMBEDDER_NAME) == {CHAMPION: "3"}  # no stale challenger left behind
    card = client.get_model_version(MODEL_NAME, "1").description
    assert f"models:/{EMBEDDER_NAME}@{CHAMPION}" in card


def test_model_card_links_the_evaluation_run_of_the_same_kedro_run(store: str, tmp_path: Path) -> None:
    """evaluation + registration in one run (pretrain earlier): the card names this very run."""
    import mlflow
    from mlflow import MlflowClient

    from dinoflow.pipelines.registration.nodes import register_backbone

    path = tmp_path / "teacher_backbone.pt"
    save_backbone(tiny_backbone(0), path)
    with mlflow.start_run(run_name="pretrain") as pre:
        pass
    summary = {"teacher_backbone": str(path), "mean": MEAN, "std": STD, "image_size": SIZE,
               "channels": 1, "mlflow_run_id": pre.info.run_id, "fingerprint": "f",
               "data": {"source": "synthetic"}, "n_train_images": 10, "steps": 1, "final": {}}  # fmt: skip
    with mlflow.start_run(run_name="evaluation+registration") as run:
        # what the evaluation node logs on the run it evaluates in (log_to_mlflow)
        mlflow.set_tags({"dinoflow.eval_data_id": "d1", "dinoflow.pretrain_run_id": pre.info.run_id})
        # an evaluation report written before the run id was recorded in it
        evaluation = ReportSet({"knn_top1": 0.5}, EvaluationReport(model=str(path), eval_data_id="d1"),
                               path.parent)
        out = register_backbone(summary, evaluation, {"embedder_name": None}).model_dump()
    assert out["lineage"]["evaluation_run_id"] == run.info.run_id
    assert "embedder" not in out
    card = MlflowClient().get_model_version(MODEL_NAME, out["version"]).description
    assert f"evaluation run: `{run.info.run_id}`" in card and "evaluation run: `None`" not in card


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture
def serve(stop_process_group):
    """The factory ``serve(store, cwd) -> (process, url)``: ``mlflow models serve`` of the embedder
    champion on loopback."""

    def serve(store: str, cwd: Path) -> tuple[subprocess.Popen, str]:
        port = free_port()
        with open(cwd / "serve.log", "wb") as logfile:  # the child keeps its own copy of the handle
            proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                 f"models:/{EMBEDDER_NAME}@{CHAMPION}", "--env-manager", "local", "-h", "127.0.0.1",
                 "-p", str(port), "--workers", "1"],
                cwd=cwd, env={**os.environ, **ENV, "MLFLOW_TRACKING_URI": store},
                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                time.sleep(1)
        stop_process_group(proc)
        raise RuntimeError(f"mlflow models serve did not come up:\n{(cwd / 'serve.log').read_text()[-3000:]}")

    return serve




@pytest.mark.slow  # one registration (backbone + embedder), a model server on loopback
def test_served_embeddings_equal_the_pyfunc_and_the_backbone(store: str, tmp_path: Path, serve, stop_process_group) -> None:
    import mlflow
    import pandas as pd

    reg = register(tmp_path, "served", seed=0, knn=0.5)
    files = image_files(tmp_path / "images")
    frame = pd.DataFrame({"image": [encode_image(p) for p in files]})

    # the backbone itself on the same preprocessed input: each file decoded and preprocessed
    backbone = RegisteredBackbone(tiny_backbone(0), MEAN, STD, SIZE, 1).eval()
    x = torch.cat([backbone.preprocess(decode_image(p, 1).unsqueeze(0)) for p in files])
    assert x.shape == (4, 1, SIZE, SIZE)
    with torch.no_grad():
        expected_cls = backbone(x).numpy()
        expected_patches = backbone.forward_patches(x).numpy()
    assert np.abs(expected_cls[:, None] - expected_cls[None]).max() > 0.1  # the images differ

    pyfunc = mlflow.pyfunc.load_model(f"models:/{EMBEDDER_NAME}@{CHAMPION}")
    meta = pyfunc.metadata
    assert [c.name for c in meta.get_input_schema().inputs] == ["image"]
    assert {p.name for p in meta.get_params_schema().params} == {"embedding", "batch_size"}
    assert meta.saved_input_example_info is not None
    in_process = pyfunc.predict(frame)
    np.testing.assert_allclose(in_process, expected_cls, atol=1e-6)
    # wrapped base64 (the `base64` tool's 76-column lines) and a data URI decode the same
    wrapped = pd.DataFrame({"image": ["\n".join(v[i:i + 76] for i in range(0, len(v), 76))
                                      for v in frame["image"][:1]]
                                     + [f"data:image/png;base64,{frame['image'][1]}"]})  # fmt: skip
    np.testing.assert_allclose(pyfunc.predict(wrapped), expected_cls[:2], atol=1e-6)
    patch_mean = pyfunc.predict(frame, params={"embedding": "patch_mean", "batch_size": 3})
    np.testing.assert_allclose(patch_mean, expected_patches.mean(axis=1), atol=1e-6)

    proc, url = serve(store, tmp_path)
    try:
        status, body = post(f"{url}/invocations", {"dataframe_split": frame.to_dict(orient="split")})
        assert status == 200, body
        served = np.asarray(body["predictions"], dtype=np.float32)
        assert served.shape == (4, 16)
        np.testing.assert_allclose(served, in_process, atol=1e-6)
        np.testing.assert_allclose(served, expected_cls, atol=1e-6)
        status, body = post(f"{url}/invocations", {
            "dataframe_split": frame.iloc[:2].to_dict(orient="split"),
            "params": {"embedding": "patches"}})  # fmt: skip
        assert status == 200, body
        np.testing.assert_allclose(np.asarray(body["predictions"]), expected_patches[:2], atol=1e-6)
        # bad input: 400 with the row named, not a 500
        bad = {"dataframe_split": {"columns": ["image"],
                                   "data": [[frame["image"][0]], [base64.b64encode(b"no image").decode()]]}}  # fmt: skip
        status, body = post(f"{url}/invocations", bad)
        assert status == 400 and "image row 1" in body.get("message", ""), body
    finally:
        stop_process_group(proc)
    assert reg["embedder"]["aliases"] == [CHAMPION]


def test_example_input_is_real_image_files() -> None:
    from dinoflow.serving import example_input

    frame = example_input()
    sizes = [Image.open(io.BytesIO(base64.b64decode(v))).size for v in frame["image"]]
    modes = [Image.open(io.BytesIO(base64.b64decode(v))).mode for v in frame["image"]]
    assert sizes == [(20, 24), (30, 26)] and modes == ["L", "RGB"]


def test_the_embedder_sees_a_wide_photo_as_its_centre_crop(tmp_path: Path, real_photo) -> None:
    import copy
    import pickle

    import pandas as pd
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from dinoflow.serving import DinoflowEmbedder

    path = tmp_path / "photo.png"  # lossless: both paths below decode the same pixels
    real_photo(640, 480).save(path)
    torch.manual_seed(0)
    vit = DinoVisionTransformer(
        img_size=224, patch_size=16, in_chans=3, embed_dim=16, depth=1, num_heads=2
    )
    with torch.no_grad():  # away from the init, as tiny_backbone: embeddings of size ~1
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model = RegisteredBackbone(vit.eval(), mean, std, 224, 3).eval()
    assert model.crop_ratio == 0.875
    embedder = DinoflowEmbedder()
    embedder.model = model
    got = embedder.predict(None, pd.DataFrame({"image": [encode_image(path)]}))

    # independently: the shorter side 480 -> 224 / 0.875 = 256, the centre 224 by slicing
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    resized = TF.resize(x, 256, interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert resized.shape == (3, 256, 341)
    crop = resized[:, 16:240, 58:282].float() / 255
    crop = (crop - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        expected = vit.forward_features(crop[None])["x_norm_clstoken"].numpy()
        squashed = TF.resize(x, [224, 224], antialias=True).float() / 255
        squashed = (squashed - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        old = vit.forward_features(squashed[None])["x_norm_clstoken"].numpy()
    assert got.shape == (1, 16) and np.abs(expected).max() > 0.5
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(old - expected).max() > 1e-3  # the squashed square is another picture

    # a version pickled before crop_ratio existed loads with the default
    before = copy.deepcopy(model)
    del before.crop_ratio
    restored = pickle.loads(pickle.dumps(before))
    assert restored.crop_ratio == 0.875
    assert torch.equal(restored.preprocess(x[None]), model.preprocess(x[None]))


def test_registration_keeps_the_evaluations_crop(tmp_path: Path, real_photo) -> None:
    from dinoflow.registry import weights_sha256
    from dinoflow.registry.store import _registered_model

    summary = {"mean": MEAN, "std": STD, "image_size": SIZE, "channels": 1}
    evaluated = _registered_model(summary, {"image_size": 24, "crop_ratio": 0.5}, tiny_backbone(0))
    assert (evaluated.image_size, evaluated.crop_ratio) == (24, 0.5)
    older = _registered_model(summary, {}, tiny_backbone(0))  # a report without the crop
    assert (older.image_size, older.crop_ratio) == (SIZE, 0.875)
    grey = torch.from_numpy(np.asarray(real_photo(64, 40).convert("L")))[None, None]
    assert evaluated.preprocess(grey).shape == (1, 1, 24, 24)
    half = _registered_model(summary, {"crop_ratio": 0.5}, tiny_backbone(0))
    assert not torch.equal(half.preprocess(grey), older.preprocess(grey))
    assert weights_sha256(half) != weights_sha256(older)
    with pytest.raises(ValueError, match="crop_ratio"):
        RegisteredBackbone(tiny_backbone(0), MEAN, STD, SIZE, 1, crop_ratio=1.2)
