"""Distillation (DINOv2 section 5): a frozen teacher, the student's EMA exported, no masking and
no drop-path, exact resume after SIGKILL, headless teachers, FLOPs, registration with lineage.

The teacher is a real tiny pretraining run on 128 Fashion-MNIST images (a few seconds).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dinoflow.config import ConfigError, DistillationConfig, PretrainConfig, validate
from dinoflow.data import channel_stats, load_splits
from dinoflow.jobs.distill import load_teacher
from dinoflow.methods.distillation import Distillation
from dinoflow.methods.frozen_teacher import backbone_flops
from dinoflow.models.vit import load_backbone
from dinoflow.training import Trainer, pretrain
from dinoflow.training.distill import distill
from tests.e2e.jobs.distill_resume_job import CROPS, STUDENT

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).parent / "jobs" / "distill_resume_job.py"

TEACHER = {
    "crops": CROPS,
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                 "drop_path_rate": 0.0},
    "head": {"n_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "optim": STUDENT["optim"],
    "train": {**STUDENT["train"], "epochs": 2},
}


@pytest.fixture(scope="module")
def train_split():
    split = load_splits(allow_download=False)["train"].subset(range(128))
    return split, *channel_stats(split)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, train_split) -> Path:
    """A real tiny pretraining run: teacher_backbone.pt, teacher_heads.pt, pretrain_summary.json."""
    folder = tmp_path_factory.mktemp("teacher")
    split, mean, std = train_split
    cfg = PretrainConfig.model_validate({**TEACHER, "train": {**TEACHER["train"], "run_dir": str(folder)}})
    summary = pretrain(cfg, split, mean, std)
    (folder / "pretrain_summary.json").write_text(summary.model_dump_json())
    return folder


def test_a_pretraining_run_directory_is_a_teacher_with_its_run(tmp_path) -> None:
    """run_pretraining writes pretrain_summary.json into its run directory (not only where the
    catalog keeps it): a run-directory teacher has its normalisation and its MLflow run."""
    import mlflow

    from dinoflow.config import DataConfig
    from dinoflow.jobs.pretrain import run_pretraining

    run_dir = tmp_path / "smoke_run"
    cfg = PretrainConfig.model_validate({**TEACHER, "train": {**TEACHER["train"], "epochs": 1,
                                                              "run_dir": str(run_dir)}})
    data = DataConfig.model_validate({"val_size": 200, "train_limit": 128, "test_limit": 100})
    with mlflow.start_run() as run:
        summary = run_pretraining(data, cfg)
    teacher = load_teacher(_config(run_dir, tmp_path / "student").teacher, in_chans=1, global_size=16)
    assert teacher.info["run_id"] == run.info.run_id == summary.mlflow_run_id
    assert teacher.mean == summary.mean and teacher.std == summary.std and teacher.heads is not None


def _config(source: str | Path, run_dir: Path, **sections) -> DistillationConfig:
    params = {**STUDENT, "teacher": {"source": str(source)},
              "train": {**STUDENT["train"], "run_dir": str(run_dir)}}
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    return DistillationConfig.model_validate(params)


# --------------------------------------------------------------------------- FLOPs
def test_flops_per_image_match_a_hand_count_and_the_base_student_is_under_a_third() -> None:
    """conf/base's teacher (128-d x 6, 50 tokens at 28 px) counted by hand, and the distillation
    student of conf/base at most 1/3 of it (what the comparison in docs/results.md needs)."""
    from dinoflow.training import backbone_from_config

    def hand(d: int, depth: int, tokens: int = 50, patches: int = 49, mlp: float = 2.0) -> int:
        per_block = (2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d
                     + 2 * 2 * tokens * d * int(mlp * d))
        return depth * per_block + 2 * patches * d * 16  # patch embedding: 4 x 4 x 1 inputs

    base = yaml.safe_load((REPO / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    teacher = backbone_from_config(PretrainConfig.model_validate(base).backbone, 28, 1)
    assert backbone_flops(teacher, 28) == hand(128, 6) == 86_523_904
    dist = yaml.safe_load((REPO / "conf/base/parameters_distillation.yml").read_text())["distillation"]
    student = backbone_from_config(DistillationConfig.model_validate(dist).backbone, 28, 1)
    assert backbone_flops(student, 28) == hand(64, 6) == 23_601_152
    assert backbone_flops(student, 28) <= backbone_flops(teacher, 28) / 3


# --------------------------------------------------------------------------- the student
def test_student_has_no_masking_and_no_drop_path(teacher_dir, train_split, tmp_path) -> None:
    with pytest.raises(ConfigError, match="drop_path_rate=0.2: DINOv2 distils without stochastic"):
        validate(DistillationConfig, {"backbone": {"drop_path_rate": 0.2}}, "distillation")
    split, mean, std = train_split
    cfg = _config(teacher_dir, tmp_path)
    teacher = load_teacher(cfg.teacher, 1, 16).frozen()
    method = Distillation(cfg, teacher, 1)
    student, pcfg = method.student, method.cfg
    assert pcfg.masking.mask_probability == 0.0
    assert not [m for m in student.modules() if float(getattr(m, "drop_prob", 0.0)) > 0]
    from dinoflow.training import build_loader

    batch = next(iter(build_loader(pcfg, split, mean, std, 0, 1, 0, 1, torch.device("cpu"))))
    student.train(True)
    with torch.no_grad():  # no stochastic depth: two training-mode passes agree exactly
        a, b = (student(batch["global_crops"], batch["local_crops"]) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["patch_logits"].shape == (2 * 16 * 16, 64)  # every patch of both global crops
    with torch.no_grad():  # a mask token anywhere in the pass would make the losses NaN
        student.backbone.mask_token.fill_(float("nan"))
    out = Trainer(method, pcfg, len(split), 1, torch.device("cpu")).step(student, batch, 0)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith("loss/"))
    assert out["loss/ibot"] > 0 and out["loss/dino"] > 0


def test_the_teacher_never_changes_and_the_student_ema_is_exported(
        teacher_dir, train_split, tmp_path, monkeypatch) -> None:
    from dinoflow.training.checkpoint import Checkpointer

    monkeypatch.setattr(Checkpointer, "clear", lambda self: None)  # keep the last checkpoint
    split, mean, std = train_split
    cfg = _config(teacher_dir, tmp_path, train={"epochs": 2})
    source = load_teacher(cfg.teacher, 1, 16)
    teacher = source.frozen()
    before = copy.deepcopy(teacher.state_dict())
    summary = distill(cfg, teacher, split, mean, std, teacher_info=source.info)
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    on_disk = load_backbone(teacher_dir / "teacher_backbone.pt").state_dict()
    assert all(torch.equal(on_disk[k], v) for k, v in teacher.backbone.state_dict().items())

    last = torch.load(max(tmp_path.rglob("step_*.pt")), weights_only=True)
    assert last["step"] == summary.steps == 16
    exported = torch.load(summary.student_backbone, weights_only=True)["state_dict"]
    ema = {k.removeprefix("backbone."): v for k, v in last["teacher"].items() if k.startswith("backbone.")}
    raw = {k.removeprefix("backbone."): v for k, v in last["student"].items() if k.startswith("backbone.")}
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # the EMA is the product ...
    assert not all(torch.equal(exported[k], raw[k]) for k in raw)  # ... not the raw student
    heads = torch.load(summary.student_heads, weights_only=True)
    assert all(torch.equal(v, last["teacher"][f"dino_head.{k}"]) for k, v in heads["dino_head"].items())
    assert summary.student_flops < summary.teacher_flops and summary.mode == "heads"


def _run_job(teacher: Path, run_dir: Path) -> dict:
    out = subprocess.run([sys.executable, str(JOB), str(teacher), str(run_dir)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sigkill_then_rerun_equals_uninterrupted(teacher_dir, tmp_path) -> None:
    reference = _run_job(teacher_dir, tmp_path / "uninterrupted")
    assert reference == {"steps": 24, "resumed_from_step": 0}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(JOB), str(teacher_dir), str(killed)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").rglob("step_*.pt")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(next((killed / "checkpoints").rglob("step_*.pt")), weights_only=True)
    assert 0 < state["step"] < 24
    resumed = _run_job(teacher_dir, killed)
    assert resumed == {"steps": 24, "resumed_from_step": state["step"]}
    for name in ("student_backbone.pt", "student_heads.pt"):
        a = torch.load(tmp_path / "uninterrupted" / name, weights_only=True)
        b = torch.load(killed / name, weights_only=True)
        flat_a = a.get("state_dict") or {f"{h}.{k}": v for h, sd in a.items() for k, v in sd.items()}
        flat_b = b.get("state_dict") or {f"{h}.{k}": v for h, sd in b.items() for k, v in sd.items()}
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name


# --------------------------------------------------------------------------- headless teachers
def test_a_released_backbone_teaches_by_fitted_heads_or_by_features(
        teacher_dir, train_split, tmp_path, monkeypatch) -> None:
    """The tiny teacher's backbone in the official DINOv2 layout (no heads): fit_heads fits
    heads once (a second run reuses them), features regresses the teacher's tokens."""
    import dinoflow.training
    from dinoflow.jobs.distill import run_distillation
    from dinoflow.weights import save_official_layout

    released = tmp_path / "released.pth"
    save_official_layout(load_backbone(teacher_dir / "teacher_backbone.pt"), released)
    data = {"val_size": 200, "train_limit": 256, "test_limit": 100}
    from dinoflow.config import DataConfig

    teacher = {"source": str(released), "backbone": TEACHER["backbone"], "fit_steps": 8,
               "fit_head": {"n_prototypes": 32, "hidden_dim": 32, "bottleneck_dim": 16}}
    cfg = _config(released, tmp_path / "fit", teacher=teacher,
                  train={"epochs": 1, "knn_every_epochs": 100})
    fitted = run_distillation(DataConfig(**data), cfg)
    assert fitted.mode == "heads" and fitted.teacher["heads"].startswith("fitted: ")
    heads = torch.load(tmp_path / "fit/teacher_heads_fit/teacher_heads.pt", weights_only=True)
    assert heads["dino_head"]["last_layer.parametrizations.weight.original1"].shape == (32, 16)

    def no_refit(*args, **kwargs):
        raise AssertionError("the fitted heads were not reused")

    monkeypatch.setattr(dinoflow.training, "pretrain", no_refit)
    again = run_distillation(DataConfig(**data), cfg)
    assert again.mode == "heads" and again.teacher["heads"] == fitted.teacher["heads"]

    feats = _config(released, tmp_path / "features", teacher={**teacher, "headless": "features"},
                    train={"epochs": 2, "log_every_steps": 1, "knn_every_epochs": 100})
    split, mean, std = train_split
    source = load_teacher(feats.teacher, 1, 16)
    assert source.heads is None
    result = distill(feats, source.frozen(), split, mean, std, teacher_info=source.info)
    assert result.mode == "features"
    history = json.loads((tmp_path / "features/history.json").read_text())
    cls_terms = [h["loss/dino"] for h in history if "loss/dino" in h]
    assert 0 <= cls_terms[-1] < cls_terms[0] <= 2  # 1 - cosine, and it is learnt


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("env", ["base", "smoke"])
def test_every_profile_of_distillation_validates(env: str) -> None:
    from dinoflow.config import deep_merge
    from dinoflow.registry import RegistrationConfig

    def load(e: str) -> dict:
        path = REPO / "conf" / e / "parameters_distillation.yml"
        return yaml.safe_load(path.read_text()) if path.exists() else {}

    merged = deep_merge(load("base"), load(env)) if env != "base" else load("base")
    cfg = validate(DistillationConfig, merged["distillation"], f"conf/{env}")
    assert cfg.backbone.drop_path_rate == 0.0
    reg = validate(RegistrationConfig, merged["distillation_registration"], f"conf/{env}")
    assert reg.model_name == "dinoflow-backbone-distilled" and reg.embedder_name is None


def test_bad_distillation_parameters_stop_before_any_work(tmp_path) -> None:
    from dinoflow.pipelines.distillation.nodes import distill as distill_node
    from dinoflow.pipelines.validation import validate_run_parameters

    params = {"distillation": {"teacher": {"source": str(tmp_path / "nowhere")},
                               "optim": {"base_lrr": 1}}, "distillation_registration": {}}
    with pytest.raises(ConfigError) as err:
        validate_run_parameters(params)
    assert "distillation.optim.base_lrr: unknown key" in str(err.value)
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        validate_run_parameters({"distillation": {"teacher": {"source": str(tmp_path / "nowhere")}}})
    bad = {**STUDENT, "backbone": {**STUDENT["backbone"], "patch_size": 3},
           "train": {**STUDENT["train"], "run_dir": str(tmp_path / "run")}}
    with pytest.raises(ConfigError, match="not a multiple of backbone.patch_size=3"):
        distill_node({}, bad, None)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the pipeline
def _register_teacher(teacher_dir: Path) -> str:
    """The tiny teacher as dinoflow-backbone v1 (champion), made by a 'pretrain' run whose
    params name its run directory, as kedro-mlflow logs them."""
    import mlflow

    from dinoflow.registry import RegistrationConfig, register_pretrained
    from dinoflow.results import PretrainSummary

    with mlflow.start_run(run_name="pretrain") as run:
        mlflow.log_param("pretrain.train.run_dir", str(teacher_dir))
    summary = PretrainSummary.model_validate_json((teacher_dir / "pretrain_summary.json").read_text())
    summary = summary.model_copy(update={"mlflow_run_id": run.info.run_id})
    decision = register_pretrained(summary, {"knn_top1": 0.5, "eval_data_id": "tiny"},
                                   RegistrationConfig(embedder_name=None, log_code=False))
    assert decision["alias"] == "champion"
    return run.info.run_id


def test_pipeline_evaluates_beside_the_teacher_and_registers_with_lineage(
        teacher_dir, tmp_path, monkeypatch) -> None:
    import mlflow
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    from dinoflow.pipelines.datasets import ReportSetDataset
    from dinoflow.pipelines.distillation import create_pipeline

    class Kept(MemoryDataset):  # the runner releases intermediate datasets; keep these
        def _release(self) -> None:
            pass

    monkeypatch.chdir(tmp_path)
    reports = tmp_path / "data/08_reporting/distillation"
    mlflow.set_experiment("dinoflow")
    teacher_run = _register_teacher(teacher_dir)
    params = {**STUDENT, "teacher": {"source": "models:/dinoflow-backbone@champion"},
              "train": {**STUDENT["train"], "epochs": 1, "run_dir": str(tmp_path / "run"),
                        "knn_bank_size": 100, "knn_query_size": 50}}
    evaluation = {"linear_epochs": 1, "seg_enabled": False, "baselines": [], "progress": False,
                  "n_pictures": 2, "knn_ks": [10, 20]}
    catalog = DataCatalog({
        "params:data": MemoryDataset({"val_size": 200, "train_limit": 256, "test_limit": 100}),
        "params:distillation": MemoryDataset(params), "params:evaluation": MemoryDataset(evaluation),
        "params:distillation_registration": MemoryDataset(
            {"model_name": "dinoflow-backbone-distilled", "embedder_name": None, "log_code": False}),
        "curated_manifest": MemoryDataset(None),
        **{n: Kept(copy_mode="assign") for n in ("distillation_summary", "distillation_registration_summary")},
        "distillation_evaluation": ReportSetDataset(folder=str(reports), metrics=str(reports / "metrics.json"),
                                                    report=str(reports / "distillation_report.json")),
    })  # fmt: skip
    with mlflow.start_run(run_name="distillation") as run:
        SequentialRunner().run(create_pipeline(), catalog)
    summary, decision = catalog.load("distillation_summary"), catalog.load("distillation_registration_summary")
    assert summary.teacher["uri"] == "models:/dinoflow-backbone/1" and summary.teacher["run_id"] == teacher_run
    assert summary.teacher["heads"].endswith("teacher_heads.pt")  # found beside the pretrain run

    metrics = json.loads((tmp_path / "data/08_reporting/distillation/metrics.json").read_text())
    assert 0.1 < metrics["knn_top1"] <= 1 and 0.1 < metrics["teacher_knn_top1"] <= 1  # 10 classes
    assert {k.removeprefix("teacher_") for k in metrics if k.startswith("teacher_")} == {
        k for k in metrics if not k.startswith("teacher_")}
    assert (decision.model_name, decision.version, decision.alias) == ("dinoflow-backbone-distilled", "1", "champion")

    client = mlflow.MlflowClient()
    student = client.get_model_version("dinoflow-backbone-distilled", "1")
    assert student.tags["dinoflow.teacher_version"] == "1"
    assert student.tags["dinoflow.teacher_run_id"] == teacher_run
    card = student.description
    assert "## Distillation" in card and "`models:/dinoflow-backbone/1`" in card
    assert "| knn_top1 | " in card.split("## Distillation")[1]  # the student beside the teacher
    assert client.get_model_version("dinoflow-backbone", "1").tags["dinoflow.distilled_into"] == \
        "dinoflow-backbone-distilled/1"
    assert client.get_run(teacher_run).data.tags["dinoflow.distilled_into"] == "dinoflow-backbone-distilled/1"
    assert client.get_run(run.info.run_id).data.tags["dinoflow.teacher_version"] == "1"

    # a fresh process loads the champion and computes what the exported student computes
    x = torch.randn(3, 1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    expected = load_backbone(summary.student_backbone).eval()
    with torch.no_grad():
        cls, patches = expected(x), expected.forward_patches(x)
    script = ("import sys, torch, mlflow\n"
              "m = mlflow.pytorch.load_model('models:/dinoflow-backbone-distilled@champion')\n"
              "x = torch.load(sys.argv[1])\n"
              "with torch.no_grad():\n"
              "    torch.save({'cls': m(x), 'patches': m.forward_patches(x)}, sys.argv[2])\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})
    assert out.returncode == 0, out.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    assert torch.allclose(got["cls"], cls, atol=1e-6) and got["cls"].shape == (3, 16)
    assert torch.allclose(got["patches"], patches, atol=1e-6) and got["patches"].shape == (3, 16, 16)
