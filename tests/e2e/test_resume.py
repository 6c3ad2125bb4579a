"""A pretrain killed with SIGKILL resumes by itself and ends with the uninterrupted weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).parent / "jobs" / "resume_job.py"
# Gram anchoring on: the Gram teacher is copied from the EMA before steps 2, 5, 8, ...; the kill
# comes after the checkpoint of step 4, between two copies: the copy must come back from it
GRAM = {"gram": {"weight": 1.0, "first_update_step": 2, "update_every": 3}}


def _run(run_dir: Path, overrides: dict) -> dict:
    out = subprocess.run([sys.executable, str(JOB), str(run_dir), json.dumps(overrides)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("overrides", [{}, GRAM], ids=["dinov2", "gram_anchoring"])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, overrides):
    reference = _run(tmp_path / "uninterrupted", overrides)
    assert reference == {"steps": 24, "resumed_from_step": 0}

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(JOB), str(killed_dir), json.dumps(overrides)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed_dir / "checkpoints").rglob("step_*.pt")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # checkpoints hold tensors and plain types only: they load without unpickling code
    state = torch.load(next((killed_dir / "checkpoints").rglob("step_*.pt")), weights_only=True)
    assert 0 < state["step"] < 24  # killed mid-run, after a checkpoint
    assert ("gram_teacher" in state) == bool(overrides)  # a part of the method, saved by name

    resumed = _run(killed_dir, overrides)  # the same command again
    assert resumed["resumed_from_step"] == state["step"] and resumed["steps"] == 24

    a = torch.load(tmp_path / "uninterrupted" / "teacher_backbone.pt", weights_only=False)["state_dict"]
    b = torch.load(killed_dir / "teacher_backbone.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    heads_a = torch.load(tmp_path / "uninterrupted" / "teacher_heads.pt", weights_only=False)
    heads_b = torch.load(killed_dir / "teacher_heads.pt", weights_only=False)
    for key, value in heads_a["dino_head"].items():
        assert torch.equal(value, heads_b["dino_head"][key]), key
