"""`KEDRO_ENV=smoke dvc repro` end to end in a temporary copy of the repository.

1. first `dvc repro`: the five stages run; metrics.json and registration.json are written (and
   the distilled student's, which names its teacher's version), and
   the registered version leads back to the data (DVC md5 of the curated manifest) and the code
   (git commit) through its MLflow runs;
2. second `dvc repro`: nothing runs;
3. `dvc exp run --set-param` on a pretrain parameter: pretrain, evaluate, register and distill
   run, curate does not; the new version is promoted or not according to the two kNN numbers;
4. `dvc push` to a local-folder remote, cache and outputs deleted, `dvc pull` restores them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"curate", "pretrain", "evaluate", "register", "distill"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-5000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _copy_project(dest: Path) -> None:
    """The files git tracks or would track (no data, venv, caches) -> dest."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and "__pycache__" not in src.parts:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _fashion_mnist_available() -> bool:
    try:
        from dinoflow.data.fashion_mnist import find_fashion_mnist

        find_fashion_mnist(allow_download=False)
        return True
    except Exception:  # noqa: BLE001 - any lookup failure means: not available offline
        return False


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smoke_dvc_repro_twice_then_param_change_then_push_pull(tmp_path: Path) -> None:
    if shutil.which("dvc") is None or shutil.which("git") is None:
        pytest.skip("dvc and git are needed")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot list the project files")
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST not found locally (data/01_raw or /usr/share/datasets)")
    repo = tmp_path / "repo"
    _copy_project(repo)
    # the editable install maps dinoflow.pipelines to this checkout's pipelines/; kedro puts the
    # copy's src/ first on sys.path, and this link makes the copy run its own pipelines too
    (repo / "src/dinoflow/pipelines").symlink_to(Path("../../pipelines"))
    env = {
        **os.environ,
        "KEDRO_ENV": "smoke",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }  # fmt: skip
    env.pop("PYTHONPATH", None)  # kedro puts the copy's src/ first on the path itself
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "commit.gpgsign=false", "commit", "-qm", "copy"], repo, env)

    # 1. everything runs once
    out = _run(["dvc", "repro"], repo, env)
    assert _ran(out) == STAGES, out[-3000:]
    metrics = json.loads((repo / "data/08_reporting/metrics.json").read_text())
    assert 0.0 <= metrics["knn_top1"] <= 1.0
    first = json.loads((repo / "data/08_reporting/registration.json").read_text())
    assert (first["version"], first["alias"]) == ("1", "champion")
    assert first["metric"] == metrics["knn_top1"]
    distilled = json.loads((repo / "data/08_reporting/distillation_registration.json").read_text())
    assert (distilled["model_name"], distilled["version"]) == ("dinoflow-backbone-distilled", "1")
    assert "teacher_knn_top1" in json.loads(
        (repo / "data/08_reporting/distillation/metrics.json").read_text())
    _run(["git", "add", "dvc.lock"], repo, env)
    _run(["git", "-c", "commit.gpgsign=false", "commit", "-qm", "repro"], repo, env)

    # lineage: registered version -> registration run -> pretrain run -> data hash and commit
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version("dinoflow-backbone", "1")
    reg_tags = client.get_run(version.run_id).data.tags
    summary = json.loads((repo / "data/06_models/pretrain_summary.json").read_text())
    assert reg_tags["dinoflow.pretrain_run_id"] == summary["mlflow_run_id"]
    assert reg_tags["dinoflow.env"] == "smoke" and reg_tags["dinoflow.pipeline"] == "registration"
    # the distilled student names its teacher's version, which names the student back
    assert client.get_model_version("dinoflow-backbone-distilled", "1").tags[
        "dinoflow.teacher_version"] == "1"  # fmt: skip
    assert version.tags["dinoflow.distilled_into"] == "dinoflow-backbone-distilled/1"
    pre_tags = client.get_run(reg_tags["dinoflow.pretrain_run_id"]).data.tags
    eval_tags = client.get_run(reg_tags["dinoflow.evaluation_run_id"]).data.tags
    report = json.loads((repo / "data/08_reporting/evaluation_report.json").read_text())
    assert eval_tags["dinoflow.pipeline"] == "evaluation"
    assert eval_tags["dinoflow.pretrain_run_id"] == summary["mlflow_run_id"]
    assert eval_tags["dinoflow.eval_data_id"] == report["eval_data_id"] == first["eval_data_id"]
    # the features' precision (evaluation.precision auto): on the MLflow run, in the report and
    # in the details, the same choice as pretrain's rule on this CPU
    details = json.loads((repo / "data/08_reporting/evaluation/evaluation_details.json").read_text())
    assert eval_tags["dinoflow.eval_precision"] == report["precision"] == details["precision"][
        "precision"] in ("fp32", "bf16")  # fmt: skip
    assert details["precision"]["why"].startswith("auto")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    manifest_md5 = next(o["md5"] for o in lock["stages"]["curate"]["outs"]
                        if o["path"] == "data/03_primary/curated_manifest.csv")  # fmt: skip
    assert pre_tags["dinoflow.curated_data_md5"] == manifest_md5
    assert version.tags["dinoflow.curated_data_md5"] == manifest_md5
    head = _run(["git", "rev-parse", "HEAD~1"], repo, env).strip()
    assert pre_tags["dinoflow.git_commit"] == head  # the commit the stages ran on

    # 2. nothing changed: nothing runs
    out = _run(["dvc", "repro"], repo, env)
    assert _ran(out) == set(), out[-3000:]
    assert "Data and pipelines are up to date" in out

    # 3. a pretrain parameter (smoke value: fewer steps) -> pretrain, evaluate, register, distill
    out = _run(["dvc", "exp", "run", "--set-param",
                "conf/smoke/parameters_pretrain.yml:pretrain.train.steps_per_epoch=10"], repo, env)  # fmt: skip
    assert _ran(out) == STAGES - {"curate"}, out[-3000:]
    second = json.loads((repo / "data/08_reporting/registration.json").read_text())
    assert second["version"] == "2" and second["champion_metric"] == first["metric"]
    beats = second["metric"] > first["metric"]
    assert second["alias"] == ("champion" if beats else "challenger")
    assert yaml.safe_load((repo / "conf/smoke/parameters_pretrain.yml").read_text())[
        "pretrain"]["train"]["steps_per_epoch"] == 10  # fmt: skip

    # 4. push to a local-folder remote, lose the cache and an output, pull them back
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    _run(["dvc", "push"], repo, env)
    backbone = repo / "data/06_models/pretrain/teacher_backbone.pt"
    before = backbone.read_bytes()
    shutil.rmtree(repo / ".dvc/cache")
    backbone.unlink()
    _run(["dvc", "pull"], repo, env)
    assert backbone.read_bytes() == before
    status = _run(["dvc", "status"], repo, env)
    assert "up to date" in status, status
