"""Model embeddings chunk by chunk on disk (``curation.embed_run``): the in-memory embeddings,
every chunk re-used by the next run, only what changed redone, and a run killed by SIGKILL
resumed to the uninterrupted result.

Data: 40 crops of a real photo (JPEG and PNG, several sizes), a tiny dinoflow ViT (32 px),
chunks of 5 rows in batches of 4 (8 chunks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dinoflow
from dinoflow import curation
from dinoflow.curation.embed import model_embeddings
from dinoflow.curation.embed_run import embed_chunks
from dinoflow.curation.ingest import load_rgb
from dinoflow.data import Split

ROWS_PER_CHUNK, N = 5, 40
MEAN, STD = [0.5] * 3, [0.25] * 3


def _stats() -> tuple[list[float], list[float]]:
    """The dataset's mean/std, as curation hands them to the embedder."""
    return MEAN, STD


def _photo_folder(root: Path, real_photo) -> Path:
    photo = real_photo(640, 480)
    root.mkdir(parents=True)
    for k in range(N):
        w, h = 48 + 8 * (k % 5), 40 + 6 * (k % 4)
        crop = photo.crop((13 * k, 9 * k, 13 * k + w, 9 * k + h))
        crop.save(root / f"photo_{k:02d}.{'png' if k % 7 == 0 else 'jpg'}", quality=90)
    return root


def _save_model(path: Path, seed: int) -> Path:
    import torch

    from dinoflow.models.vit import DinoVisionTransformer, save_backbone

    torch.manual_seed(seed)
    save_backbone(DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), path)
    return path


def _cfg(tmp: Path, work: Path, checkpoint: str = "teacher.pt"):
    return curation.curation_config({
        "work_dir": str(work), "workers": 1, "show_progress": False,
        "embedding": {"kind": "dinoflow", "checkpoint": str(tmp / checkpoint), "image_size": 32,
                      "batch_size": 4, "rows_per_chunk": ROWS_PER_CHUNK, "mean": MEAN, "std": STD,
                      "device": "cpu", "precision": "fp32"},
    })  # fmt: skip


def _embed(tmp: Path, work: Path, on_chunk=None, cfg=None, meta=None):
    """Ingest the folder into ``work``, then embed every readable row there."""
    paths = sorted((tmp / "photos").iterdir())
    split = Split(ids=[p.name for p in paths], labels=np.full(len(paths), -1, np.int64),
                  class_names=[], channels=3, paths=paths, name="train")  # fmt: skip
    cfg = cfg or _cfg(tmp, work)
    ingested, _ = curation.ingest({"train": split}, cfg)
    meta = ingested if meta is None else meta
    rows = np.flatnonzero(meta["readable"].to_numpy())

    def load(r: int) -> np.ndarray:
        return load_rgb(split, int(meta["index"].iat[r]), 40_000_000)

    emb = embed_chunks(cfg.embedding, load, meta, rows, _stats, work, False, on_chunk)
    return meta, emb, load, rows, cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_photo):
    tmp = tmp_path_factory.mktemp("embed_run")
    _photo_folder(tmp / "photos", real_photo)
    _save_model(tmp / "teacher.pt", 0)
    return tmp


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted run (in this process)."""
    return _embed(data, data / "work_reference")


def _chunks(work: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((work / "embed").iterdir())}


def test_chunks_give_the_in_memory_embeddings_and_are_reused(data, reference) -> None:
    meta, emb, load, rows, cfg = reference
    assert isinstance(emb, np.memmap) and Path(emb.filename) == data / "work_reference" / "embeddings.npy"
    assert emb.shape == (N, 32) and emb.dtype == np.float32 and len(rows) == N
    assert len(_chunks(data / "work_reference")) == N // ROWS_PER_CHUNK
    in_memory = model_embeddings(cfg.embedding, load, rows, N, _stats, progress=False)
    assert np.allclose(emb, in_memory, atol=1e-5)  # other batches: equal to float rounding
    before, computed = _chunks(data / "work_reference"), []
    again = _embed(data, data / "work_reference", computed.append)[1]
    assert computed == [] and _chunks(data / "work_reference") == before
    assert np.array_equal(again, emb)


def test_other_weights_or_a_changed_image_redo_only_what_they_touch(data, reference) -> None:
    work = data / "work_changed"
    meta, emb, *_ = _embed(data, work)
    changed = meta.copy()
    changed.loc[12, "sha256"] = "0" * 64  # row 12's pixels changed (its chunk: rows 10-14)
    computed = []
    _embed(data, work, computed.append, meta=changed)
    assert [c.start for c in computed] == [10]
    assert len(_chunks(work)) == N // ROWS_PER_CHUNK  # the stale chunk was deleted
    _save_model(data / "other.pt", 1)
    computed = []
    other = _embed(data, work, computed.append, cfg=_cfg(data, work, "other.pt"))[1]
    assert len(computed) == N // ROWS_PER_CHUNK and not np.allclose(other, emb)


JOB = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from tests.unit.curation.test_embed_run import _embed

if __name__ == "__main__":
    tmp, work, done = Path(sys.argv[1]), Path(sys.argv[2]), []

    def hook(chunk):  # SIGKILL this process once K chunks are on disk
        done.append(chunk)
        if len(done) == int(os.environ["EMBED_TEST_KILL_AFTER_CHUNKS"]):
            os.kill(os.getpid(), signal.SIGKILL)

    _embed(tmp, work, hook)
"""


def test_killed_embedding_resumes_to_the_uninterrupted_result(data, reference) -> None:
    """SIGKILL after 3 of 8 chunks (in a subprocess), then a second run: it computes only the
    missing chunks and gives exactly what the uninterrupted run gave."""
    work = data / "work_killed"
    (data / "job.py").write_text(textwrap.dedent(JOB.format(tests=str(Path(__file__).parents[3]))))
    src = str(Path(dinoflow.__file__).resolve().parents[1])
    env = {**os.environ, "EMBED_TEST_KILL_AFTER_CHUNKS": "3",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run([sys.executable, str(data / "job.py"), str(data), str(work)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    done_before = {name.split("-")[0] for name in _chunks(work) if name.endswith(".npy") and "tmp" not in name}
    assert len(done_before) == 3 and not (work / "embeddings.npy").exists()
    computed = []
    meta, emb, *_ = _embed(data, work, computed.append)
    assert len(computed) == N // ROWS_PER_CHUNK - 3
    assert {f"{c.start:010d}" for c in computed}.isdisjoint(done_before)
    assert np.array_equal(emb, reference[1]) and meta.equals(reference[0])
