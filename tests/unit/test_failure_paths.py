"""The failure paths a user meets first: bad keys, kills, full disks, two runs, bad checkpoints.

The rows of the README's "Troubleshooting: what happens when" table are tests here and in
tests/e2e/test_failure_paths.py (the `kedro run`s and the killed registration), except an
unreadable image during training (tests/e2e/test_unreadable_training.py) and the MLflow URI hint.
They use real files, real processes (killed for real), a real full filesystem (a small tmpfs) and
real MLflow stores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.config import ConfigError, PretrainConfig
from dinoflow.data import Split
from dinoflow.errors import CheckpointError, LockedError
from dinoflow.files import FolderLock, recover_swaps, staging_folder, swap_in

REPO = Path(__file__).resolve().parents[2]
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


# --------------------------------------------------------------------------- parameters
def test_unknown_sections_keys_and_values_are_named_together() -> None:
    from dinoflow.pipelines.validation import validate_run_parameters

    params = {"data": {}, "pretrain": {"optim": {"base_lrr": 0.1}}, "pretrian": {"train": {}},
              "evaluation": {"linear_epochs": -2}}
    with pytest.raises(ConfigError) as err:
        validate_run_parameters(params)
    text = str(err.value)
    assert "pretrian: unknown parameter section (did you mean 'pretrain'?)" in text
    assert "pretrain.optim.base_lrr: unknown key" in text
    assert "evaluation.linear_epochs" in text and "-2" in text
    # a run of the pretrain pipeline alone checks only what it reads, but still every section name
    with pytest.raises(ConfigError, match="pretrian"):
        validate_run_parameters({"pretrain": {}, "pretrian": {}}, used={"pretrain"})
    assert validate_run_parameters({"pretrain": {}, "evaluation": {"linear_epochs": -2}},
                                   used={"pretrain"}) == ["pretrain"]


def test_tuning_paths_into_pretrain_are_checked_with_the_pretrain_section() -> None:
    from dinoflow.pipelines.validation import validate_run_parameters

    tuning = {"space": {"optim.teacher_temp_endd": {"type": "float", "low": 0.01, "high": 0.1}}}
    with pytest.raises(ConfigError, match="teacher_temp_endd"):
        validate_run_parameters({"pretrain": {}, "tuning": tuning}, used={"tuning"})



# --------------------------------------------------------------------------- checkpoints
def _tiny(run_dir: Path, **train) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "crops": {"global_size": 16, "local_size": 8, "n_local": 1},
        "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1,
                     "num_heads": 2, "drop_path_rate": 0.1},
        "head": {"n_prototypes": 16, "hidden_dim": 16, "bottleneck_dim": 8},
        "train": {"epochs": 1, "steps_per_epoch": 6, "batch_size": 4, "device": "cpu",
                  "run_dir": str(run_dir), "checkpoint_every_steps": 1, "log_every_steps": 1,
                  "progress": False, **train},
    })  # fmt: skip


def _split(n: int = 16) -> Split:
    rng = np.random.default_rng(0)
    return Split(ids=[f"x/{i}" for i in range(n)], labels=np.zeros(n, np.int64), class_names=["a"],
                 channels=1, images=rng.integers(0, 256, (n, 16, 16), dtype=np.uint8))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "teacher_backbone.pt", weights_only=True)["state_dict"]


def test_keeps_the_last_two_and_falls_back_from_a_truncated_newest(tmp_path, caplog) -> None:
    from dinoflow.training import pretrain

    pretrain(_tiny(tmp_path / "ref"), _split(), [0.5], [0.25])
    with pytest.raises(SystemExit, match="stopped after step 4"):
        pretrain(_tiny(tmp_path / "run"), _split(), [0.5], [0.25], stop_after_steps=4)
    files = sorted((tmp_path / "run" / "checkpoints").rglob("step_*.pt"))
    assert [f.name for f in files] == ["step_00000003.pt", "step_00000004.pt"]  # the newest 2
    for f in files:  # tensors and plain types only
        assert torch.load(f, weights_only=True)["step"] in (3, 4)
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated copy
    with caplog.at_level(logging.WARNING, logger="dinoflow.training.checkpoint"):
        result = pretrain(_tiny(tmp_path / "run"), _split(), [0.5], [0.25])
    assert result.resumed_from_step == 3
    assert str(newest) in caplog.text and "step_00000003.pt" in caplog.text
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # the same weights as without the kill


def test_no_readable_checkpoint_names_every_file(tmp_path) -> None:
    from dinoflow.training import pretrain

    with pytest.raises(SystemExit):
        pretrain(_tiny(tmp_path / "run", keep_checkpoints=1), _split(), [0.5], [0.25],
                 stop_after_steps=2)
    (only,) = (tmp_path / "run" / "checkpoints").rglob("step_*.pt")
    only.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(only)):
        pretrain(_tiny(tmp_path / "run", keep_checkpoints=1), _split(), [0.5], [0.25])


# --------------------------------------------------------------------------- full disk
FULL_DISK_JOB = """
import sys, torch
from dinoflow.files import atomic_torch_save
from dinoflow.errors import DiskFullError
target = sys.argv[1] + "/checkpoint.pt"
atomic_torch_save({"w": torch.zeros(10)}, target)          # a small first checkpoint: fits
try:
    atomic_torch_save({"w": torch.zeros(2_000_000)}, target)  # 8 MB: does not fit in 2 MB
except DiskFullError as exc:
    print("MESSAGE", exc)
    print("KEPT", torch.load(target, weights_only=True)["w"].shape[0])
"""


def _tmpfs_prefix(mount: Path) -> list[str] | None:
    """A command prefix that runs its command with a 2 MB tmpfs mounted at ``mount`` in a mount
    namespace of its own (gone with the process): as root, else as a user namespace's root.
    None where neither is allowed."""
    script = f"mount -t tmpfs -o size=2m tmpfs {mount} && exec \"$@\""
    for prefix in (["unshare", "-m", "sh", "-c", script, "sh"],
                   ["unshare", "-rm", "sh", "-c", script, "sh"]):
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    prefix = _tmpfs_prefix(mount)
    if prefix is None:
        pytest.skip("no way to mount a small tmpfs here (needs root or user namespaces)")
    out = subprocess.run([*prefix, sys.executable, "-c", FULL_DISK_JOB, str(mount)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, **TELEMETRY_OFF})
    assert out.returncode == 0, out.stderr[-3000:]
    message = next(line for line in out.stdout.splitlines() if line.startswith("MESSAGE"))
    assert f"disk full while writing {mount}/checkpoint.pt" in message
    assert "free on" in message and "the previous checkpoint.pt is intact" in message
    assert "KEPT 10" in out.stdout  # the checkpoint written before is whole


# --------------------------------------------------------------------------- one writer
HOLDER = """
import sys, time
from dinoflow.files import FolderLock
with FolderLock(sys.argv[1], "pretrain"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_is_told_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"in use by process {proc.pid}") as err:
            FolderLock(tmp_path, "pretrain").__enter__()
        assert "(pretrain:" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with caplog.at_level(logging.WARNING, logger="dinoflow.files"), FolderLock(tmp_path, "pretrain"):
        assert json.loads((tmp_path / ".dinoflow.lock").read_text())["pid"] == os.getpid()
    assert f"left by process {proc.pid}" in caplog.text


# --------------------------------------------------------------------------- evaluation swap
def _write_set(folder: Path, tag: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pca_features.png").write_text(f"picture {tag}")
    (folder / "metrics.json").write_text(json.dumps({"run": tag}))


def _consistent(tmp_path: Path) -> str:
    folder, metrics = tmp_path / "evaluation", tmp_path / "metrics.json"
    tag = json.loads(metrics.read_text())["run"]
    assert (folder / "pca_features.png").read_text() == f"picture {tag}"
    return tag


def test_evaluation_outputs_are_swapped_in_whole(tmp_path) -> None:
    folder, metrics = tmp_path / "evaluation", tmp_path / "metrics.json"
    first = staging_folder(folder)
    _write_set(first, "old")
    swap_in(first, folder, {"metrics.json": metrics})
    assert _consistent(tmp_path) == "old"

    # killed while computing: a staging folder of a dead process, the old set untouched
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    half = tmp_path / f"evaluation.staging-{dead}"
    half.mkdir()
    (half / "pca_features.png").write_text("picture new")
    assert _consistent(tmp_path) == "old"
    recover_swaps(tmp_path)
    assert not half.exists() and _consistent(tmp_path) == "old"

    # killed after the commit point (complete and renamed, not yet moved): the next run finishes
    second = staging_folder(folder)
    _write_set(second, "new")
    (second / ".swap.json").write_text(json.dumps(
        {"target": str(folder), "files": {"metrics.json": str(metrics)}}))
    os.replace(second, tmp_path / "evaluation.commit")
    assert _consistent(tmp_path) == "old"  # readers still see the old set whole
    recover_swaps(tmp_path)
    assert _consistent(tmp_path) == "new" and not (tmp_path / "evaluation.commit").exists()


# --------------------------------------------------------------------------- MLflow runs
def test_runs_left_running_by_a_dead_process_are_ended_as_killed(tmp_path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from dinoflow.pipelines.hooks import end_runs_of_dead_processes, process_tags

    mlflow.set_experiment("dinoflow")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    client = MlflowClient()
    exp = client.get_experiment_by_name("dinoflow").experiment_id
    orphan = client.create_run(exp, tags={**process_tags(), "dinoflow.pid": dead})
    alive = client.create_run(exp, tags=process_tags())  # this process: still running
    assert end_runs_of_dead_processes() == [orphan.info.run_id]
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert "was gone" in client.get_run(orphan.info.run_id).data.tags["dinoflow.ended_by"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"



# --------------------------------------------------------------------------- the GPU profile
def test_gpu_profile_sizes_itself_on_a_cpu_machine(caplog) -> None:
    import yaml

    from dinoflow.config import deep_merge
    from dinoflow.launch import resolve_processes
    from dinoflow.training import resolve_num_workers

    base = yaml.safe_load((REPO / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    gpu = yaml.safe_load((REPO / "conf/gpu/parameters_pretrain.yml").read_text())["pretrain"]
    cfg = PretrainConfig.model_validate(deep_merge(base, gpu))
    assert cfg.launcher.nproc_per_node == "auto" and cfg.train.num_workers == "auto"
    with caplog.at_level(logging.WARNING, logger="dinoflow.launch"):
        resolved = resolve_processes(cfg)
    assert resolved.launcher.nproc_per_node == 1  # no GPU visible: one process, not 8
    assert "on the CPU: expect seconds to minutes per step" in caplog.text
    files = Split(
        ids=["a.jpg"], labels=np.array([-1]), class_names=[], channels=3, paths=[Path("a.jpg")]
    )
    workers = resolve_num_workers(resolved, files, torch.device("cpu")).train.num_workers
    cores = os.cpu_count() or 1
    assert workers == (0 if cores < 2 else max(2, cores // 3))  # the step keeps its cores


def test_nan_advice_names_only_what_the_run_can_change() -> None:
    from dinoflow.monitor import divergence_advice

    sk = PretrainConfig.model_validate({"loss": {"centering": "sinkhorn_knopp"}})
    softmax = PretrainConfig.model_validate({"loss": {"centering": "softmax"}})
    assert "centering" not in divergence_advice(sk)
    assert "pretrain.loss.centering=sinkhorn_knopp" in divergence_advice(softmax)
    assert "precision=fp32" not in divergence_advice(softmax)  # auto/fp32 runs: nothing to switch
    bf16 = PretrainConfig.model_validate({"train": {"precision": "bf16"}})
    assert "pretrain.train.precision=fp32" in divergence_advice(bf16)


def test_the_catalog_replaces_an_evaluation_set_whole(tmp_path) -> None:
    """``ReportSetDataset``: metrics.json (beside the folder), the report (inside it) and the
    pictures change together; the report's paths point into the folder; a swap committed by a
    run killed before it finished is completed by the next load."""
    from dinoflow.pipelines.datasets import ReportSet, ReportSetDataset
    from dinoflow.results import EvaluationReport

    folder, metrics = tmp_path / "evaluation", tmp_path / "metrics.json"
    dataset = ReportSetDataset(folder=str(folder), metrics=str(metrics),
                               report=str(folder / "report.json"))

    def made(tag: str) -> ReportSet:
        made_in = tmp_path / f"node-{tag}"
        made_in.mkdir()
        (made_in / "pca_features.png").write_text(f"picture {tag}")
        report = EvaluationReport(model=tag, eval_data_id="d",
                                  files={"pca": str(made_in / "pca_features.png")})
        return ReportSet({"run": tag}, report, made_in)

    dataset.save(made("old"))
    loaded = dataset.load()
    assert loaded.metrics == {"run": "old"} and json.loads(metrics.read_text()) == {"run": "old"}
    assert loaded.report.files == {"pca": str(folder / "pca_features.png")}
    assert (folder / "pca_features.png").read_text() == "picture old"
    assert not (tmp_path / "node-old").exists()  # the node's folder was moved in

    # killed after the commit point of the next save: readers still see the old set whole ...
    new = made("new")
    staging = staging_folder(folder)
    shutil.copytree(new.folder, staging, dirs_exist_ok=True)
    (staging / "report.json").write_text(new.report.model_dump_json())
    (staging / ".m.json").write_text(json.dumps({"run": "new"}))
    (staging / ".swap.json").write_text(json.dumps(
        {"target": str(folder), "files": {".m.json": str(metrics)}}))
    os.replace(staging, tmp_path / "evaluation.commit")
    assert _consistent_set(folder, metrics) == "old"
    # ... and the next load finishes the swap before reading
    assert dataset.load().metrics == {"run": "new"} and _consistent_set(folder, metrics) == "new"


def _consistent_set(folder: Path, metrics: Path) -> str:
    tag = json.loads(metrics.read_text())["run"]
    assert (folder / "pca_features.png").read_text() == f"picture {tag}"
    return tag
