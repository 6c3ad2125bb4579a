"""A folder that changed after its split was made does not kill a training run.

Each file unreadable at training time is replaced by another image of the split, chosen from
(seed, epoch, index) alone, and named in a warning; the files are counted in the summary, the
MLflow run and the checkpoints; past ``train.max_unreadable_fraction`` the run stops with one
``DataError`` naming them. The photos are crops of the Debian wallpapers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoflow.data import Split, load_splits
from dinoflow.errors import DataError
from dinoflow.training import pretrain
from dinoflow.training.data import (
    REPLACEMENT_TRIES,
    MultiCropDataset,
    StepBatchSampler,
    UnreadableFiles,
    replacement_order,
)
from tests.e2e.jobs.unreadable_resume_job import MEAN, STD, tiny_cfg, train

JOB = Path(__file__).parent / "jobs" / "unreadable_resume_job.py"
PHOTOS = sorted(Path("/usr/share/backgrounds").glob("*.jpg"), key=lambda p: p.stat().st_size)[:10]
N_IMAGES = 40
SIZES = (32, 40, 48, 64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """40 JPEG crops of 32-64 px cut from real photos (decoded at 1/8 scale: fast)."""
    from PIL import Image

    if not PHOTOS:
        pytest.skip("no photos in /usr/share/backgrounds (Debian's wallpaper packages)")
    root = tmp_path_factory.mktemp("photos")
    scaled = []
    for path in PHOTOS:
        with Image.open(path) as im:
            im.draft("RGB", (im.width // 8, im.height // 8))
            scaled.append(im.convert("RGB"))
    for j in range(N_IMAGES):
        im, size = scaled[j % len(scaled)], SIZES[j % len(SIZES)]
        x, y = (j * 37) % (im.width - size), (j * 23) % (im.height - size)
        im.crop((x, y, x + size, y + size)).save(root / f"photo_{j:02d}.jpg", quality=90)
    return root


@pytest.fixture
def folder(photos, tmp_path) -> Path:
    """A copy of the photos this test may break."""
    return Path(shutil.copytree(photos, tmp_path / "folder"))


def listed(folder: Path) -> Split:
    """The train split of the folder as every pipeline builds it (all 40 photos, no val/test)."""
    train = load_splits(source="image_folder", path=str(folder), val_size=0, test_fraction=0.0)
    assert len(train["train"]) == N_IMAGES
    return train["train"]


def break_files(folder: Path, deleted: str, truncated: str) -> list[str]:
    """Delete one file and cut another to half its bytes; -> their ids, sorted."""
    (folder / deleted).unlink()
    data = (folder / truncated).read_bytes()
    (folder / truncated).write_bytes(data[: len(data) // 2])
    return sorted([deleted, truncated])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "teacher_backbone.pt", weights_only=False)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_replacement_order_is_every_other_image_from_a_drawn_start():
    order = list(replacement_order(40, 0, 3, 7))
    assert sorted(order) == [i for i in range(40) if i != 7]  # each other image, once
    assert order == list(replacement_order(40, 0, 3, 7))  # a function of its arguments
    assert order != list(replacement_order(40, 0, 4, 7))  # another epoch: another start
    assert all(b == (a + 1) % 40 or (a, b) == (6, 8) for a, b in pairwise(order))
    assert len(list(replacement_order(1000, 0, 0, 5))) == REPLACEMENT_TRIES
    assert list(replacement_order(1, 0, 0, 0)) == []


def test_a_replacement_does_not_depend_on_what_was_read_before(folder):
    split = listed(folder)
    bad = break_files(folder, "photo_05.jpg", "photo_06.jpg")
    i = split.ids.index("photo_05.jpg")
    fresh = MultiCropDataset(split, seed=0)[(12, 2, i)]
    used = MultiCropDataset(split, seed=0)
    for item in [(0, 0, split.ids.index("photo_06.jpg")), (3, 1, i), (9, 2, 0)]:
        used[item]
    again = used[(12, 2, i)]
    assert torch.equal(fresh["image"], again["image"])
    assert fresh["unreadable"] == again["unreadable"] and fresh["unreadable"][0] == "photo_05.jpg"
    assert set(fresh["unreadable"]) <= set(bad)
    stand_in = next(j for j in replacement_order(N_IMAGES, 0, 2, i) if split.ids[j] not in bad)
    assert torch.equal(fresh["image"], split.load(stand_in))  # the first readable one
    assert torch.equal(fresh["generator"].get_state(), again["generator"].get_state())


def test_unreadable_files_are_replaced_counted_and_logged(folder, tmp_path, store, caplog):
    import mlflow

    split = listed(folder)
    bad = break_files(folder, "photo_03.jpg", "photo_17.jpg")  # after the split was built
    with mlflow.start_run() as run:
        summary = pretrain(tiny_cfg(tmp_path / "run"), split, MEAN, STD)
    assert summary.steps == 10 and summary.n_unreadable_files == 2
    assert summary.unreadable_files == bad
    assert json.loads(summary.model_dump_json())["unreadable_files"] == bad
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())
    warned = [r.getMessage() for r in caplog.records if r.name == "dinoflow.training.data"]
    for name in bad:
        assert sum(str(folder / name) in message for message in warned) == 1, warned
    client = mlflow.MlflowClient(store)
    history = client.get_metric_history(run.info.run_id, "data/unreadable_files")
    assert history[-1].value == 2 and history[-1].step <= 10
    text = Path(client.download_artifacts(run.info.run_id, "unreadable_files.txt", str(tmp_path)))
    assert text.read_text().splitlines() == bad


def test_the_same_run_with_loader_workers_is_bit_identical(folder, tmp_path):
    split = listed(folder)
    bad = break_files(folder, "photo_08.jpg", "photo_21.jpg")
    one = pretrain(tiny_cfg(tmp_path / "in_process"), split, MEAN, STD)
    two = pretrain(tiny_cfg(tmp_path / "workers", num_workers=2), split, MEAN, STD)
    assert one.unreadable_files == two.unreadable_files == bad
    assert_same_weights(tmp_path / "in_process", tmp_path / "workers")


def test_the_count_survives_a_resume(folder, tmp_path, store):
    """The broken files are in step 0's batch only: a run resumed at step 1 never reads them,
    and still counts them (from its checkpoint)."""
    import mlflow

    split = listed(folder)
    first = next(iter(StepBatchSampler(N_IMAGES, 8, 0, 1, 0, 0, 1)))
    bad = break_files(folder, *(split.ids[i] for _, _, i in first[:2]))
    cfg = tiny_cfg(tmp_path / "run", epochs=1, checkpoint_every_steps=1)
    with pytest.raises(SystemExit, match="stopped after step 1"), mlflow.start_run():
        pretrain(cfg, split, MEAN, STD, stop_after_steps=1)
    with mlflow.start_run() as run:
        resumed = pretrain(cfg, split, MEAN, STD)
    assert resumed.resumed_from_step == 1 and resumed.unreadable_files == bad
    history = mlflow.MlflowClient(store).get_metric_history(
        run.info.run_id, "data/unreadable_files"
    )
    assert [m.value for m in history] == [2]


def test_past_the_limit_the_run_stops_naming_the_files(folder, tmp_path):
    split = listed(folder)
    bad = break_files(folder, "photo_11.jpg", "photo_30.jpg")
    with pytest.raises(DataError) as err:  # 0.01 of 40 images: not even one
        cfg = tiny_cfg(tmp_path / "run", max_unreadable_fraction=0.01, log_every_steps=5)
        pretrain(cfg, split, MEAN, STD)  # checked after step 5: every photo read once
    message = str(err.value)
    assert "2 of the 40 training images are unreadable" in message
    assert "pretrain.train.max_unreadable_fraction=0.01" in message
    assert f"{bad[0]}, {bad[1]}." in message
    assert not (tmp_path / "run" / "teacher_backbone.pt").exists()


def test_the_limit_lists_the_first_20_and_the_count():
    names = [f"gone/{i:03d}.jpg" for i in range(25)]
    files = UnreadableFiles(names[:3], n_images=1000, max_fraction=0.01, every=10)
    files.add({"unreadable": names[3:]})
    with pytest.raises(DataError) as err:
        files.sync(step=10)
    message = str(err.value)
    assert message.startswith("25 of the 1000 training images are unreadable")
    assert ", ".join(names[:20]) + " and 5 more." in message and names[20] not in message
    assert UnreadableFiles(names, 2500, 0.01, 10).sync(step=10) == names  # 25 <= 25: goes on


def _gather_worker(rank: int, init_file: str, out: str) -> None:
    """One of 2 processes: each has found other files; both must see them all, and stop."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        files = UnreadableFiles([], n_images=40, max_fraction=0.05, every=2)
        files.add({"unreadable": [f"rank{rank}.jpg"]})
        result: dict = {"synced": files.sync(step=2)}
        files.add({"unreadable": ["both.jpg"] if rank else []})
        try:
            files.sync(step=4)
        except DataError as exc:
            result["error"] = str(exc)
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_processes_count_each_others_files(tmp_path):
    # forked: the children start with this process's imports, in a fraction of a spawn's time
    args = (str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_gather_worker, args=args, nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["synced"] == ["rank0.jpg", "rank1.jpg"]
        assert result["error"].startswith("3 of the 40 training images are unreadable")


def test_sigkill_then_resume_equals_the_uninterrupted_run(folder, tmp_path):
    split = listed(folder)
    split_json = tmp_path / "split.json"
    split_json.write_text(json.dumps({"root": str(folder), "ids": split.ids}))
    bad = break_files(folder, "photo_02.jpg", "photo_25.jpg")
    reference = train(tmp_path / "uninterrupted", folder, split.ids)
    assert reference == {"steps": 30, "resumed_from_step": 0, "unreadable_files": bad}

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(JOB), str(killed_dir), str(split_json)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((killed_dir / "checkpoints").rglob("step_*.pt")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(next((killed_dir / "checkpoints").rglob("step_*.pt")), weights_only=True)
    assert 0 < state["step"] < 30 and state["unreadable_files"] == bad  # both in epoch 0

    resumed = train(killed_dir, folder, split.ids)  # the same run again (here: in process)
    assert resumed == {**reference, "resumed_from_step": state["step"]}
    assert_same_weights(tmp_path / "uninterrupted", killed_dir)
