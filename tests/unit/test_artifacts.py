"""The one model loader: every source a user can name, from real files and a real SQLite MLflow
store in tmp_path (conftest's), and the one message for a source that cannot be loaded.

Also: versions registered before ``dinoflow.registry`` became a package (the fixture under
tests/fixtures/registered_backbone_c2ef209/, written by that commit's code) still load.
"""

from __future__ import annotations

import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.artifacts import SOURCE_FORMS, ModelLoadError, load_model
from dinoflow.errors import DataError
from dinoflow.models.heads import DINOHead
from dinoflow.models.vit import BACKBONE_FORMAT, DinoVisionTransformer, save_backbone
from dinoflow.registry import RegisteredBackbone
from dinoflow.results import DistillationSummary, PretrainSummary
from dinoflow.weights import save_official_layout

MEAN, STD, SIZE = [0.3], [0.35], 8
KWARGS = {"img_size": SIZE, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 1,
          "num_heads": 2}  # fmt: skip
FIXTURE = Path(__file__).parents[1] / "fixtures" / "registered_backbone_c2ef209"


def tiny(seed: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(**KWARGS)
    with torch.no_grad():  # away from the init: a wrong tensor shows in the outputs
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def write_heads(path: Path) -> Path:
    torch.save({"dino_head": DINOHead(16, 8, 16, 8).state_dict()}, path)
    return path


def run_dir(root: Path, vit: DinoVisionTransformer, run_id: str | None = None) -> Path:
    """A pretraining run directory as pretrain writes it (backbone, heads, summary)."""
    root.mkdir(parents=True, exist_ok=True)
    save_backbone(vit, root / "teacher_backbone.pt")
    write_heads(root / "teacher_heads.pt")
    summary = PretrainSummary(run_dir=str(root), teacher_backbone=str(root / "teacher_backbone.pt"),
                              teacher_heads=str(root / "teacher_heads.pt"), steps=3, mean=MEAN,
                              std=STD, image_size=SIZE, channels=1, fingerprint="fp-1",
                              mlflow_run_id=run_id)  # fmt: skip
    (root / "pretrain_summary.json").write_text(summary.model_dump_json())
    return root


def register(vit: DinoVisionTransformer, pretrain_run_id: str | None = None) -> str:
    """``vit`` logged and registered as dinoflow-backbone, champion; -> the logging run's id."""
    import mlflow

    from dinoflow.registry import log_and_register, promote

    model = RegisteredBackbone(vit, MEAN, STD, SIZE, 1, crop_ratio=0.5)
    tags = {"dinoflow.pretrain_run_id": pretrain_run_id} if pretrain_run_id else {}
    with mlflow.start_run(run_name="registration") as run:
        version = log_and_register(model, tags={**tags, "dinoflow.fingerprint": "fp-1"},
                                   log_code=False)  # fmt: skip
    promote(version.version, 0.5, "data-1")
    return run.info.run_id


# --------------------------------------------------------------------------- files
def test_a_dinoflow_backbone_file(tmp_path: Path) -> None:
    vit = tiny()
    save_backbone(vit, tmp_path / "backbone.pt")
    got = load_model(tmp_path / "backbone.pt")
    assert (got.kind, got.source, got.uri) == ("backbone_file", str(tmp_path / "backbone.pt"),
                                               str(tmp_path / "backbone.pt"))  # fmt: skip
    assert isinstance(got.backbone, DinoVisionTransformer) and not got.backbone.training
    assert same_outputs(got.backbone, vit)
    assert got.mean is None and got.registered is None and got.heads_file is None


def test_a_pretraining_run_directory(tmp_path: Path) -> None:
    vit = tiny()
    folder = run_dir(tmp_path / "run", vit, run_id="abc123")
    got = load_model(folder)
    assert (got.kind, got.uri, got.run_id, got.fingerprint) == (
        "run_dir",
        str(folder),
        "abc123",
        "fp-1",
    )
    assert (got.mean, got.std, got.image_size, got.channels) == (MEAN, STD, SIZE, 1)
    assert got.heads_file == folder / "teacher_heads.pt"
    assert same_outputs(got.backbone, vit)


def test_a_distillation_run_directory(tmp_path: Path) -> None:
    vit = tiny(1)
    folder = tmp_path / "distillation"
    folder.mkdir()
    save_backbone(vit, folder / "student_backbone.pt")
    summary = DistillationSummary(run_dir=str(folder), student_backbone=str(folder / "student_backbone.pt"),
                                  student_heads="", steps=2, mean=[0.4], std=[0.2], image_size=SIZE,
                                  mlflow_run_id="run-9")  # fmt: skip
    (folder / "distillation_summary.json").write_text(summary.model_dump_json())
    got = load_model(folder)
    assert (got.kind, got.mean, got.std, got.run_id, got.heads_file) == ("run_dir", [0.4], [0.2],
                                                                         "run-9", None)  # fmt: skip
    assert same_outputs(got.backbone, vit)


def test_a_released_weights_file_into_the_architecture_given(tmp_path: Path) -> None:
    vit = tiny(2)
    save_official_layout(vit, tmp_path / "released.pth")
    with pytest.raises(ModelLoadError, match="holds no architecture") as err:
        load_model(tmp_path / "released.pth", key="distillation.teacher.source")
    assert err.value.kind == "released"
    got = load_model(
        tmp_path / "released.pth", architecture=lambda: DinoVisionTransformer(**KWARGS)
    )
    assert got.kind == "released" and got.load_report.source_format == "official"
    assert same_outputs(got.backbone, vit) and not got.backbone.training
    wrong = {**KWARGS, "embed_dim": 32}
    with pytest.raises(ModelLoadError, match="does not fit the backbone"):
        load_model(tmp_path / "released.pth", architecture=lambda: DinoVisionTransformer(**wrong))


# --------------------------------------------------------------------------- MLflow
def test_a_registered_version_by_alias_and_number_and_a_logged_model(tmp_path: Path) -> None:
    vit = tiny(3)
    run_id = register(vit, pretrain_run_id="pretrain-1")
    by_alias = load_model("models:/dinoflow-backbone@champion")
    assert (by_alias.kind, by_alias.uri) == ("registered", "models:/dinoflow-backbone/1")
    assert (by_alias.model_name, by_alias.version, by_alias.run_id, by_alias.fingerprint) == (
        "dinoflow-backbone", "1", "pretrain-1", "fp-1")  # fmt: skip
    assert isinstance(by_alias.registered, RegisteredBackbone) and not by_alias.registered.training
    assert by_alias.registered.backbone is by_alias.backbone
    assert (by_alias.mean, by_alias.std, by_alias.image_size, by_alias.crop_ratio,
            by_alias.channels) == (MEAN, STD, SIZE, 0.5, 1)  # fmt: skip
    assert same_outputs(by_alias.backbone, vit)
    by_number = load_model("models:/dinoflow-backbone/1")
    assert by_number.uri == "models:/dinoflow-backbone/1" and same_outputs(by_number.backbone, vit)
    logged = load_model(f"runs:/{run_id}/backbone")
    assert (logged.kind, logged.uri, logged.version) == ("logged", f"runs:/{run_id}/backbone", None)
    assert logged.mean == MEAN and same_outputs(logged.backbone, vit)


def test_a_registered_versions_heads_are_its_pretraining_runs(tmp_path: Path) -> None:
    """find_heads: the run directory the pretraining run logged, if it holds the same weights."""
    import mlflow

    vit = tiny(4)
    folder = run_dir(tmp_path / "pretrain", vit)
    with mlflow.start_run(run_name="pretrain") as run:
        mlflow.log_param("pretrain.train.run_dir", str(folder))
    register(vit, pretrain_run_id=run.info.run_id)
    assert load_model("models:/dinoflow-backbone@champion").heads_file is None  # not looked for
    found = load_model("models:/dinoflow-backbone@champion", find_heads=True)
    assert found.heads_file == folder / "teacher_heads.pt"
    save_backbone(tiny(5), folder / "teacher_backbone.pt")  # a later run overwrote the folder
    assert load_model("models:/dinoflow-backbone@champion", find_heads=True).heads_file is None


def test_a_recorded_registered_version_loads_by_its_class_path(tmp_path: Path) -> None:
    """The fixture was saved by mlflow.pytorch with the code of c2ef209 (registry.py a module):
    logged to a run, registered, loaded by the loader and by a fresh process."""
    import mlflow

    expected = np.load(FIXTURE / "expected.npz")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(FIXTURE / "model"), "backbone")
    mlflow.register_model(f"runs:/{run.info.run_id}/backbone", "dinoflow-backbone")
    got = load_model("models:/dinoflow-backbone/1")
    assert type(got.registered) is RegisteredBackbone
    assert (got.mean, got.std, got.image_size, got.crop_ratio) == ([0.3], [0.35], 8, 0.875)
    np.testing.assert_allclose(got.registered.embed(expected["images"]).numpy(), expected["cls"],
                               atol=1e-6)  # fmt: skip
    script = ("import pickle, sys, torch\n"  # nothing of dinoflow imported: the pickle does it
              f"m = torch.load({str(FIXTURE / 'model/data/model.pth')!r}, weights_only=False)\n"
              "print(type(m).__module__, type(m).__name__, 'mlflow' in sys.modules)\n")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["dinoflow.registry", "RegisteredBackbone", "False"]


def test_new_versions_are_pickled_under_the_same_class_path() -> None:
    model = RegisteredBackbone(tiny(), MEAN, STD, SIZE, 1)
    data = pickle.dumps(model, protocol=4)
    names = [arg for op, arg, _ in pickletools.genops(data) if op.name == "SHORT_BINUNICODE"]
    assert "dinoflow.registry" in names and "dinoflow.registry.model" not in names
    assert same_outputs(pickle.loads(data), model)


# --------------------------------------------------------------------------- the one message
def _sources(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save({"format": BACKBONE_FORMAT}, tmp_path / "damaged.pt")  # no kwargs, no weights
    return {"missing": str(tmp_path / "nowhere.pt"), "empty": str(tmp_path / "empty"),
            "text": str(tmp_path / "notes.txt"), "damaged": str(tmp_path / "damaged.pt"),
            "unregistered": "models:/dinoflow-backbone@champion",
            "no run": "runs:/0123456789abcdef/backbone"}  # fmt: skip


@pytest.mark.parametrize("case", ["missing", "empty", "text", "damaged", "unregistered", "no run"])
def test_a_source_that_cannot_be_loaded_is_named_with_every_accepted_form(tmp_path, case) -> None:
    source = _sources(tmp_path)[case]
    with pytest.raises(ModelLoadError) as err:
        load_model(source, key="evaluation.model")
    message = str(err.value)
    assert message.startswith(f"evaluation.model: cannot load {source}: ")
    assert message.endswith(SOURCE_FORMS)
    for form in (
        "models:/<name>/<version>",
        "models:/<name>@<alias>",
        "runs:/<run id>/<path>",
        "run directory",
        "dinoflow backbone file",
        "released DINOv2 weights file",
    ):
        assert form in message
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)
    again = pickle.loads(pickle.dumps(err.value))  # e.g. from a worker process
    assert str(again) == message and again.source == source


def test_consumers_load_through_it(tmp_path: Path) -> None:
    """Evaluation takes the run directory's preprocessing; serving wants a registered model."""
    from dinoflow.jobs.evaluate import load_model_for_evaluation
    from dinoflow.serving import load_registered_backbone

    vit = tiny(6)
    folder = run_dir(tmp_path / "run", vit)
    backbone, info = load_model_for_evaluation(str(folder), None)
    assert (info["source"], info["mean"], info["image_size"]) == (str(folder), MEAN, SIZE)
    assert same_outputs(backbone, vit)
    with pytest.raises(ValueError, match="evaluation.model: cannot load .*nowhere"):
        load_model_for_evaluation(str(tmp_path / "nowhere"), None)
    with pytest.raises(ValueError, match="not an MLflow model URI"):
        load_registered_backbone(str(folder))
    register(vit)
    assert same_outputs(
        load_registered_backbone("models:/dinoflow-backbone@champion").backbone, vit
    )
