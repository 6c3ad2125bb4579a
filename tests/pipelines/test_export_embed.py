"""Export (ONNX with onnxruntime, timm) and batch embeddings (parquet + faiss), and both pipelines
through the Kedro CLI on a tiny backbone registered as champion in a tmp MLflow SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.export import (
    ExportConfig,
    export_backbone,
    export_onnx,
    onnx_max_abs_diff,
    timm_create_model_kwargs,
    timm_model,
)
from dinoflow.models.vit import DinoVisionTransformer
from dinoflow.registry import RegisteredBackbone

REPO = Path(__file__).resolve().parents[2]
MEAN, STD = [0.3], [0.35]


def backbone(size: int = 16, **kw) -> RegisteredBackbone:
    torch.manual_seed(0)
    args = dict(img_size=size, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=2) | kw
    vit = DinoVisionTransformer(**args)
    with torch.no_grad():  # trained-looking weights: LayerScale and biases away from their init
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return RegisteredBackbone(vit.eval(), MEAN, STD, size, args["in_chans"]).eval()


def test_onnx_round_trip_at_two_batch_sizes(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = backbone()
    path = export_onnx(model, tmp_path / "backbone.onnx", image_size=16)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["cls", "patch_tokens"]
    assert session.get_inputs()[0].shape[1:] == [1, 16, 16]  # batch free, the rest fixed
    for batch in (1, 5):  # neither is the batch of 2 the export traced with
        x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(batch))
        cls, patches = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            assert np.abs(cls - model(x).numpy()).max() < 1e-4
            assert np.abs(patches - model.forward_patches(x).numpy()).max() < 1e-4
        assert cls.shape == (batch, 24) and patches.shape == (batch, 16, 24)
    diffs = onnx_max_abs_diff(path, model, 16, [1, 3])
    assert set(diffs) == {"cls_b1", "patch_tokens_b1", "cls_b3", "patch_tokens_b3"}
    assert max(diffs.values()) < 1e-4


@pytest.mark.parametrize("kw", [{}, {"ffn": "swiglu", "num_register_tokens": 2,
                                      "layerscale_init": None, "in_chans": 3,
                                      "interpolate_offset": 0.0, "interpolate_antialias": True}])  # fmt: skip
def test_timm_create_model_gives_the_same_embeddings(tmp_path: Path, kw: dict) -> None:
    import timm
    from safetensors.torch import load_file

    model = backbone(**kw)
    summary = export_backbone(model, ExportConfig(out_dir=str(tmp_path), onnx=False))
    kwargs = json.loads((tmp_path / "timm_create_model.json").read_text())
    assert kwargs == timm_create_model_kwargs(model) and kwargs["pretrained"] is False
    # what a user types: timm alone, the exported kwargs and the exported file
    net = timm.create_model(**kwargs)
    net.load_state_dict(load_file(str(tmp_path / "timm_backbone.safetensors")))
    net.eval()
    assert type(net).__name__ == "VisionTransformer"
    x = torch.randn(3, model.in_chans, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), net(x)
        assert (ours - theirs).abs().max() < 1e-5
        assert ours.abs().max() > 0.1  # not a trivial zero match
        tokens = net.forward_features(x)  # (B, prefix + N, D) after the final norm
        assert (tokens[:, net.num_prefix_tokens:] - model.forward_patches(x)).abs().max() < 1e-5
        # another input size: timm resamples the position embeddings with antialias and no
        # offset, as a backbone built with interpolate_offset 0 / antialias (register releases);
        # the dinov2 default (offset 0.1, no antialias) differs there, by about 1e-3
        x24 = torch.randn(2, model.in_chans, 24, 24, generator=torch.Generator().manual_seed(2))
        diff = float((net(x24) - model(x24)).abs().max())
        timm_like = (model.backbone.interpolate_offset, model.backbone.interpolate_antialias) == (0.0, True)
        assert diff < 1e-5 if timm_like else 1e-5 < diff < 2e-2
    assert summary["max_abs_diff"]["timm/cls"] < 1e-5
    assert (timm_model(kwargs, tmp_path / "timm_backbone.safetensors")(x) - ours).abs().max() < 1e-5


def test_export_json_holds_the_preprocessing_an_onnx_user_reproduces(tmp_path: Path, real_photo) -> None:
    import onnxruntime as ort
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    model = backbone(size=16)
    export_backbone(model, ExportConfig(out_dir=str(tmp_path), timm=False, check_batch_sizes=[1]))
    spec = json.loads((tmp_path / "export.json").read_text())["preprocessing"]
    steps = {s["op"]: s for s in spec["steps"]}
    ops = ["channels", "resize_shorter_side", "center_crop", "scale", "normalize"]
    assert [s["op"] for s in spec["steps"]] == ops
    assert (spec["image_size"], spec["crop_ratio"], spec["in_chans"]) == (16, 0.875, 1)
    assert steps["resize_shorter_side"]["size"] == 18  # round(16 / 0.875)
    assert steps["resize_shorter_side"]["interpolation"] == "bilinear"
    assert steps["resize_shorter_side"]["antialias"] is True
    assert steps["center_crop"]["size"] == [16, 16]
    assert steps["scale"]["factor"] == 1 / 255
    assert (steps["normalize"]["mean"], steps["normalize"]["std"]) == (MEAN, STD)

    # what a user does from export.json alone, on a real 60x40 photo, then the ONNX file
    grey = real_photo(240, 160).convert("L").resize((60, 40), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(grey))[None]  # (1, 40, 60)
    resize = steps["resize_shorter_side"]
    x = TF.resize(x, resize["size"], interpolation=InterpolationMode.BILINEAR, antialias=True)
    size = steps["center_crop"]["size"][0]
    top, left = round((x.shape[1] - size) / 2), round((x.shape[2] - size) / 2)
    x = x[:, top : top + size, left : left + size].float() * steps["scale"]["factor"]
    x = (x - steps["normalize"]["mean"][0]) / steps["normalize"]["std"][0]
    onnx_file = str(tmp_path / "backbone.onnx")
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    cls, _ = session.run(None, {"images": x[None].numpy()})
    expected = model.embed(torch.from_numpy(np.asarray(grey))[None, None]).numpy()
    assert np.abs(expected).max() > 0.5
    assert np.abs(cls - expected).max() < 1e-4


@pytest.fixture
def _project_copy(project_copy):
    """The factory ``_project_copy(tmp_path) -> Path``: a copy of the Kedro project at tmp_path / "project"."""

    def _project_copy(tmp_path: Path) -> Path:
        return project_copy(tmp_path / "project")

    return _project_copy


def _register_champion(store: str, tmp_path: Path) -> RegisteredBackbone:
    """A tiny backbone registered as dinoflow-backbone v1, champion, in the store ``store``."""
    import mlflow

    from dinoflow.registry import log_and_register, promote

    model = backbone(size=28)
    mlflow.set_tracking_uri(store)
    # artifacts in tmp_path (the default ./mlruns would be the caller's working directory)
    mlflow.MlflowClient(store).create_experiment("dinoflow",
                                                 artifact_location=(tmp_path / "mlruns").as_uri())
    mlflow.set_experiment("dinoflow")
    with mlflow.start_run(run_name="registration"):
        version = log_and_register(model, input_example_batch=1, log_code=False)
        promote(version.version, 0.5, "data")
    return model


def _kedro(root: Path, store: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store}
    kedro = Path(sys.executable).with_name("kedro")
    out = subprocess.run([str(kedro), "run", "--env", "smoke", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _folder(root: Path) -> list[str]:
    """Three kinds of image (horizontal stripes, vertical stripes, a bright disc), three each,
    in two formats and several sizes, plus an unreadable file; returns the sorted ids."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    kinds = {"hstripes": (yy // 5 % 2) * 200.0, "vstripes": (xx // 5 % 2) * 200.0,
             "disc": ((yy - 20) ** 2 + (xx - 20) ** 2 < 150) * 230.0}  # fmt: skip
    for kind, base in kinds.items():
        (root / kind).mkdir(parents=True)
        for i, (size, fmt) in enumerate(((40, "png"), (33, "jpg"), (52, "png"))):
            noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy, "L").resize((size, size)).save(root / kind / f"{i}.{fmt}")
    (root / "disc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return sorted(f"{k}/{i}.{f}" for k in kinds for i, f in enumerate(("png", "jpg", "png")))


@pytest.mark.slow  # two `kedro run`s (a Kedro + kedro-mlflow start each)
def test_export_and_embed_pipelines_through_the_cli(tmp_path: Path, _project_copy) -> None:
    import faiss
    import mlflow

    from dinoflow.embeddings import load_embeddings, nearest_neighbours
    from dinoflow.serving import preprocess_images

    store = f"sqlite:///{tmp_path}/mlflow.db"
    model = _register_champion(store, tmp_path)
    root = _project_copy(tmp_path)

    # export: the champion by default
    _kedro(root, store, "--pipelines=export")
    out = root / "data/06_models/export"
    assert {p.name for p in out.iterdir()} == {"backbone.onnx", "timm_backbone.safetensors",
                                              "timm_create_model.json", "export.json"}  # fmt: skip
    summary = json.loads((root / "data/08_reporting/export/export_summary.json").read_text())
    assert summary["source"] == "models:/dinoflow-backbone@champion"
    assert summary["preprocessing"]["mean"] == MEAN and summary["preprocessing"]["image_size"] == 28
    assert max(summary["max_abs_diff"].values()) < 1e-4 and len(summary["max_abs_diff"]) == 3
    assert onnx_max_abs_diff(out / "backbone.onnx", model, 28, [4])["cls_b4"] < 1e-4
    client = mlflow.MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("dinoflow").experiment_id],
                             "tags.`dinoflow.pipeline` = 'export'")[0]  # fmt: skip
    assert {a.path for a in client.list_artifacts(run.info.run_id, "export")} == {
        "export/backbone.onnx", "export/timm_backbone.safetensors",
        "export/timm_create_model.json", "export/export.json"}  # fmt: skip
    assert run.data.metrics["export/timm/cls"] < 1e-5

    # embed a folder
    folder = tmp_path / "images"
    ids = _folder(folder)
    _kedro(root, store, "--pipelines=embed", "--params", f"embed.folder={folder},embed.n_queries=3")
    frame, vectors = load_embeddings(root / "data/07_model_output/embeddings.parquet")
    assert list(frame.columns) == ["id", "path"] and frame["id"].tolist() == ids
    assert frame["path"].tolist() == [str(folder / i) for i in ids]
    assert vectors.shape == (9, 24) and vectors.dtype == np.float32
    # the stored vectors are the backbone's CLS on the service's preprocessing
    x = preprocess_images(model, [folder / i for i in ids])
    with torch.no_grad():
        np.testing.assert_allclose(vectors, model(x).numpy(), atol=1e-5)
    index = faiss.read_index(str(root / "data/07_model_output/embeddings.faiss"))
    assert index.ntotal == 9 and index.d == 24
    sims, rows = nearest_neighbours(index, vectors, 2)
    assert (rows[:, 0] == np.arange(9)).all() and np.allclose(sims[:, 0], 1, atol=1e-5)
    # a nearest neighbour by brute force on the vectors is the index's first other row
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -2)
    # (by similarity: two neighbours within float noise of each other may come in either order,
    # as faiss's AVX-512 and AVX2 kernels round differently)
    np.testing.assert_allclose(cos[np.arange(9), rows[:, 1]], cos.max(1), atol=1e-5)
    # a query image embedded the same way finds its own row
    q = ids.index("vstripes/1.jpg")
    with torch.no_grad():
        qv = model(preprocess_images(model, [folder / ids[q]])).numpy()
    assert nearest_neighbours(index, qv, 1)[1][0, 0] == q
    report = json.loads((root / "data/08_reporting/embed/embed_summary.json").read_text())
    assert report["n_images"] == 10 and report["n_embedded"] == 9
    assert [s["path"] for s in report["skipped"]] == [str(folder / "disc/broken.png")]
    assert len(report["queries"]) == 3 and all(len(q["neighbours"]) == 5 for q in report["queries"])
    assert (root / "data/08_reporting/embed/neighbours.png").stat().st_size > 20_000


def test_embed_node_on_the_curated_set(tmp_path: Path, fmnist_splits, monkeypatch) -> None:
    """The default source: the curated train items, in the manifest's data."""
    import pandas as pd
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    from dinoflow.embeddings import EmbedConfig, load_embeddings
    from dinoflow.pipelines.embed import create_pipeline

    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model = _register_champion(store, tmp_path)
    train = fmnist_splits["train"]
    kept = [train.ids[i] for i in range(0, 400, 4)]  # 100 curated items
    params = {"folder": None, "limit": 60, "batch_size": 16, "progress": False, "n_queries": 2,
              "log_to_mlflow": False,
              "parquet_path": str(tmp_path / "e.parquet"), "index_path": str(tmp_path / "e.faiss"),
              "report_dir": str(tmp_path / "report")}  # fmt: skip
    catalog = DataCatalog({
        "params:data": MemoryDataset({"val_size": 5000}),
        "params:embed": MemoryDataset(params),
        "curated_manifest": MemoryDataset(pd.DataFrame({"item_id": kept})),
        "embed_summary": MemoryDataset(),
    })  # fmt: skip
    SequentialRunner().run(create_pipeline(), catalog)
    summary = catalog.load("embed_summary")
    assert summary["source"] == "curated:fashion_mnist" and summary["n_embedded"] == 60
    frame, vectors = load_embeddings(tmp_path / "e.parquet")
    assert frame["id"].tolist() == [i for i in train.ids if i in set(kept)][:60]
    assert (frame["path"] == "").all()  # in-memory images: the id names the item
    rows = [train.ids.index(i) for i in frame["id"][:3]]
    x = torch.cat([model.preprocess(train.load(r).unsqueeze(0)) for r in rows])
    with torch.no_grad():
        np.testing.assert_allclose(vectors[:3], model(x).numpy(), atol=1e-5)
    assert EmbedConfig().model == "models:/dinoflow-backbone@champion"


def test_bad_parameters_and_inputs_are_named(tmp_path: Path) -> None:
    from dinoflow.config import ConfigError, validate
    from dinoflow.embeddings import EmbedConfig, folder_image_set
    from dinoflow.serving import load_registered_backbone

    with pytest.raises(ConfigError) as err:
        validate(ExportConfig, {"opset": 12, "onx": True}, "export")
    assert "export.opset" in str(err.value) and "export.onx: unknown key" in str(err.value)
    with pytest.raises(ConfigError, match="embed.embedding"):
        validate(EmbedConfig, {"embedding": "patches"}, "embed")  # not one vector per image
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="embed.folder: no images under"):
        folder_image_set(tmp_path / "empty")
    with pytest.raises(ValueError, match="not an MLflow model URI"):
        load_registered_backbone(str(tmp_path / "teacher_backbone.pt"))
    with pytest.raises(ValueError, match="cannot load models:/dinoflow-backbone@champion"):
        load_registered_backbone("models:/dinoflow-backbone@champion")  # an empty store
