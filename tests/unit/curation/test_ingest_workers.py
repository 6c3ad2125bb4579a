"""The pipeline's ingest (``curation.ingest_run``): the same result on 1 and 2 worker processes,
chunks on disk re-used by the next run, only a changed file's chunk redone, and a run killed by
SIGKILL resumed to the uninterrupted result.

Data: 40 crops of a real photo (JPEG and PNG, several sizes), a truncated JPEG, a text file named
.png and an empty file, and 300 Fashion-MNIST images held in memory as a second split.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dinoflow
from dinoflow.curation.ingest import describe_split
from dinoflow.curation.ingest_run import IngestSettings, ingest_splits, plan_chunks
from dinoflow.data import Split

# the module (``dinoflow.curation.ingest`` the attribute is the pipeline step function)
ingest_module = sys.modules["dinoflow.curation.ingest"]

SETTINGS = IngestSettings(thumb_size=16, max_pixels=40_000_000, compute_phash=True, phash_min_side=64)
FILES, ARRAYS = 4, 64  # items per chunk: 11 file chunks + 5 in-memory chunks
BROKEN = ("truncated.jpg", "not_an_image.png", "empty.jpg")


def _photo_folder(root: Path, real_photo) -> Path:
    photo = real_photo(640, 480)
    root.mkdir(parents=True)
    for k in range(40):
        w, h = 96 + 8 * (k % 5), 72 + 6 * (k % 4)
        crop = photo.crop((13 * k, 9 * k, 13 * k + w, 9 * k + h))
        crop.save(root / f"photo_{k:02d}.{'png' if k % 7 == 0 else 'jpg'}", quality=90)
    whole = (root / "photo_01.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "not_an_image.png").write_text("not a picture\n")
    (root / "empty.jpg").write_bytes(b"")
    return root


def _splits(root: Path, fmnist: np.ndarray) -> dict[str, Split]:
    paths = sorted(root.iterdir())
    return {
        "train": Split(ids=[p.name for p in paths], labels=np.full(len(paths), -1, np.int64),
                       class_names=[], channels=3, paths=paths, name="train"),
        "val": Split(ids=[f"val/{i:05d}" for i in range(len(fmnist))],
                     labels=np.arange(len(fmnist), dtype=np.int64) % 10, class_names=[],
                     channels=1, images=fmnist, name="val"),
    }  # fmt: skip


def _ingest(splits, work, workers, **kw):
    return ingest_splits(splits, SETTINGS, work, workers, FILES, ARRAYS, progress=False, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_photo, fmnist_splits):
    tmp = tmp_path_factory.mktemp("ingest_workers")
    fmnist = np.ascontiguousarray(fmnist_splits["train"].images[:300])
    np.save(tmp / "fmnist.npy", fmnist)
    return tmp, _splits(_photo_folder(tmp / "photos", real_photo), fmnist)


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted run on one worker (in this process)."""
    tmp, splits = data
    return _ingest(splits, tmp / "work_reference", 1)


def _chunk_files(work: Path) -> dict[str, int]:
    return {p.relative_to(work).as_posix(): p.stat().st_mtime_ns
            for p in sorted((work / "ingest").rglob("*"))}  # fmt: skip


def test_one_and_two_workers_give_the_same_result(data, reference) -> None:
    tmp, splits = data
    meta1, thumbs1, stats1 = reference
    meta2, thumbs2, stats2 = _ingest(splits, tmp / "work_two", 2)
    assert (stats1.workers, stats2.workers) == (1, 2)
    assert meta1.equals(meta2) and list(meta1.columns) == list(meta2.columns)
    assert np.array_equal(thumbs1, thumbs2) and thumbs1.shape == (len(meta1), 16, 16, 3)
    assert isinstance(thumbs2, np.memmap) and Path(thumbs2.filename) == tmp / "work_two" / "thumbnails.npy"
    # the same rows as each split described in this process at once, in item order
    for name, split in splits.items():
        frame, thumbs = describe_split(split, name, 16, SETTINGS.max_pixels, True, 64)
        rows = (meta2["split"] == name).to_numpy()
        assert frame.equals(meta2[rows].reset_index(drop=True))
        assert np.array_equal(thumbs, thumbs2[rows])
    broken = meta2.set_index("item_id").loc[list(BROKEN)]
    assert not broken["readable"].any() and (broken["reason"] == "unreadable").all()
    assert meta2["readable"].sum() == 40 + 300
    # one parquet + one npy per chunk, nothing else
    files = _chunk_files(tmp / "work_two")
    assert stats2.chunks == 11 + 5 and len(files) == 2 * stats2.chunks + 2  # + the two split folders
    assert sum(f.endswith(".parquet") for f in files) == sum(f.endswith(".npy") for f in files) == 16


def test_a_second_run_reuses_every_chunk(data, reference, monkeypatch) -> None:
    tmp, splits = data
    work = tmp / "work_reference"
    before = _chunk_files(work)
    decoded = []
    real_decode = ingest_module.decode_file
    monkeypatch.setattr(ingest_module, "decode_file", lambda *a: decoded.append(a) or real_decode(*a))
    meta, thumbs, stats = _ingest(splits, work, 1)
    assert decoded == [] and stats.chunks_reused == stats.chunks and stats.images_reused == len(meta)
    assert _chunk_files(work) == before  # nothing rewritten
    assert meta.equals(reference[0]) and np.array_equal(thumbs, reference[1])


def test_a_changed_file_or_setting_redoes_only_what_it_touches(data, reference, monkeypatch) -> None:
    tmp, _ = data
    shutil.copytree(tmp / "photos", tmp / "photos_changed")  # the other tests keep theirs
    splits = _splits(tmp / "photos_changed", np.load(tmp / "fmnist.npy"))
    work = tmp / "work_changed"
    _ingest(splits, work, 1)
    changed = splits["train"].paths[9]  # in the third chunk of 4 files
    real_photo_bytes = splits["train"].paths[10].read_bytes()
    changed.write_bytes(real_photo_bytes)  # other content, other size
    decoded = []
    real_decode = ingest_module.decode_file
    monkeypatch.setattr(ingest_module, "decode_file", lambda *a: decoded.append(a[0]) or real_decode(*a))
    computed = []
    meta, _, stats = _ingest(splits, work, 1, on_chunk=computed.append)
    assert [c.start for c in computed] == [8] and computed[0].name == "train"
    assert [Path(p).name for p in decoded] == [p.name for p in splits["train"].paths[8:12]]
    assert stats.chunks_reused == stats.chunks - 1
    row = meta.set_index("item_id").loc[changed.name]
    assert row["sha256"] == meta.set_index("item_id").loc[splits["train"].paths[10].name, "sha256"]
    assert row["sha256"] != reference[0].set_index("item_id").loc[changed.name, "sha256"]
    assert len(_chunk_files(work)) == 2 * stats.chunks + 2  # the stale chunk was deleted
    # another thumbnail size: every chunk has another key
    plan = plan_chunks(splits, IngestSettings(8, SETTINGS.max_pixels, True, 64), work / "ingest", FILES, ARRAYS)
    assert not any(c.done() for c in plan)


JOB = """
import os, signal, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from tests.unit.curation.test_ingest_workers import _ingest, _splits

if __name__ == "__main__":
    tmp, work = Path(sys.argv[1]), Path(sys.argv[2])
    kill_after, done = int(os.environ.get("INGEST_TEST_KILL_AFTER_CHUNKS", "0")), []

    def hook(chunk):  # SIGKILL this process once K chunks are on disk
        done.append(chunk)
        if len(done) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    _ingest(_splits(tmp / "photos", np.load(tmp / "fmnist.npy")), work, 2, on_chunk=hook)
"""


def test_killed_run_resumes_to_the_uninterrupted_result(data, reference) -> None:
    """SIGKILL after 5 of 16 chunks (2 workers in a subprocess), then a second run: it computes
    only the missing chunks and gives what the uninterrupted run gave."""
    tmp, splits = data
    work = tmp / "work_killed"
    (tmp / "job.py").write_text(textwrap.dedent(JOB.format(tests=str(Path(__file__).parents[3]))))
    src = str(Path(dinoflow.__file__).resolve().parents[1])
    env = {**os.environ, "INGEST_TEST_KILL_AFTER_CHUNKS": "5",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run([sys.executable, str(tmp / "job.py"), str(tmp), str(work)], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    # run() returned: the killed process's workers ended too (they held its output pipes)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    done_before = [c for c in plan_chunks(splits, SETTINGS, work / "ingest", FILES, ARRAYS) if c.done()]
    assert 5 <= len(done_before) < 16
    assert not (work / "thumbnails.npy").exists()
    computed = []
    meta, thumbs, stats = _ingest(splits, work, 2, on_chunk=computed.append)
    assert stats.chunks_reused == len(done_before) and len(computed) == 16 - len(done_before)
    assert {(c.name, c.start) for c in computed}.isdisjoint({(c.name, c.start) for c in done_before})
    assert meta.equals(reference[0]) and np.array_equal(thumbs, reference[1])
    assert isinstance(meta, pd.DataFrame)


def test_the_pipeline_step_returns_the_memmap_and_its_timing(data, reference) -> None:
    """``curation.ingest`` with ``work_dir`` and ``workers``: the thumbnails memory-mapped from
    the work folder, the stage's seconds and workers in the table's attrs (the report's
    ``timings_s``), carried through the next step."""
    from dinoflow import curation

    tmp, splits = data
    cfg = curation.curation_config({
        "workers": 2, "work_dir": str(tmp / "work_step"), "show_progress": False,
        "ingest": {"files_per_chunk": FILES, "arrays_per_chunk": ARRAYS},
    })  # fmt: skip
    meta, thumbs = curation.ingest(splits, cfg)
    assert isinstance(thumbs, np.memmap) and np.array_equal(thumbs, reference[1])
    assert meta[reference[0].columns].equals(reference[0])
    timing = curation.quality(meta, cfg).attrs["timings_s"]
    assert timing["ingest"]["workers"] == 2 and timing["ingest"]["chunks"] == 16
    assert timing["ingest"]["images"] == len(meta) and timing["quality"]["workers"] == 1



def test_shards_ingest_like_their_folder_on_two_workers(data, reference) -> None:
    """The folder written as tar shards: 2 workers read the members by range and give the rows
    and thumbnails of the folder's files (their paths aside: ``<shard>#<member>``); a second run
    reuses every chunk (a member is keyed by its shard, offset and size, and the shard's stat)."""
    from dinoflow.config import DataConfig
    from dinoflow.data.shard_writer import sample_key, write_shards
    from dinoflow.data.sources import get_source

    tmp, splits = data
    report = write_shards(tmp / "photos", str(tmp / "shards" / "s-%06d.tar"), maxcount=16,
                          progress=False)
    train, test = get_source("shards").splits(DataConfig(source="shards", path=report.data_path))
    shards = {"train": train, "test": test}
    meta, thumbs, stats = _ingest(shards, tmp / "work_shards", 2)
    assert stats.workers == 2 and report.n_shards == 3 and len(meta) == len(splits["train"])
    folder = reference[0][reference[0]["split"] == "train"].reset_index(drop=True)
    used: set[str] = set()
    keys = [sample_key(item_id, used) for item_id in folder["item_id"]]  # the writer's keys
    row_of_key = {item_id.split("/", 1)[1]: j for j, item_id in enumerate(meta["item_id"])}
    for i, key in enumerate(keys):
        got, want = meta.loc[row_of_key[key]], folder.loc[i]
        for column in ("readable", "width", "height", "file_bytes", "sha256", "phash", "reason"):
            assert got[column] == want[column], (want["item_id"], column)
        assert np.array_equal(thumbs[row_of_key[key]], reference[1][i])
    again = _ingest(shards, tmp / "work_shards", 2)
    assert again[2].chunks_reused == again[2].chunks and again[0].equals(meta)
