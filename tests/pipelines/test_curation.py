"""Builds the messy image folder the curation tests run on (helper module, not a test file)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def smooth_image(seed: int, w: int, h: int) -> np.ndarray:
    """A distinct, natural-looking RGB image (H, W, 3): random 6x6 colours, bicubic upsampled."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, side: int = 30000) -> None:
    """A valid 1-bit PNG of side x side pixels (a decompression bomb: ~100 KB on disk)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


# name -> expected quarantine reason (files the run must drop for what they are)
BAD = {
    "truncated.jpg": "unreadable",
    "empty.png": "unreadable",
    "text.png": "unreadable",
    "tiny.png": "too_small",
    "sliver.png": "extreme_aspect",
    "uniform.png": "low_information",
    "nearly_uniform.png": "low_information",
    "bomb.png": "too_large",
    "notes.txt": "not_an_image",
    ".hidden.png": "hidden",
}
# valid files, plain or tricky, that must all be kept
GOOD = [
    "a.png", "b.jpg", "d.webp", "e.tif", "Ünïcödé 名前.png", "UPPER.JPG", "cmyk.jpg",
    "rgba.png", "palette.png", "gray16.png", "exif_rot.jpg", "anim.gif",
]  # fmt: skip
DUP_PAIRS = [("a.png", "a_copy.bmp"), ("b.jpg", "b_recompressed.jpg")]
EVAL_TWIN = "c.bmp"  # its pixels are also in the eval folder


def build_messy_folder(root: Path) -> Path:
    """Create the messy folder under root; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    a = smooth_image(1, 96, 80)
    Image.fromarray(a).save(root / "a.png")
    Image.fromarray(a).save(root / "a_copy.bmp")  # same pixels, other format
    b = smooth_image(2, 120, 90)
    Image.fromarray(b).save(root / "b.jpg", quality=95)
    with Image.open(root / "b.jpg") as im:
        im.save(root / "b_recompressed.jpg", quality=75)
    Image.fromarray(smooth_image(3, 100, 100)).save(root / "c.bmp")
    Image.fromarray(smooth_image(4, 90, 110)).save(root / "d.webp", lossless=True)
    Image.fromarray(smooth_image(5, 128, 96)).save(root / "e.tif")
    Image.fromarray(smooth_image(6, 80, 80)).save(root / "Ünïcödé 名前.png")
    Image.fromarray(smooth_image(7, 100, 70)).save(root / "UPPER.JPG", quality=95)
    Image.fromarray(smooth_image(8, 90, 90)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    rgba = np.dstack([smooth_image(9, 80, 96), np.full((96, 80), 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white after decoding
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    pal = Image.fromarray(smooth_image(10, 88, 72)).quantize(64)
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0)
    g16 = (smooth_image(11, 96, 96)[:, :, 0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(root / "gray16.png")  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display: stored 100x60 -> shown 60x100
    Image.fromarray(smooth_image(12, 100, 60)).save(root / "exif_rot.jpg", exif=exif, quality=95)
    frames = [Image.fromarray(smooth_image(13 + k, 70, 70)).convert("P") for k in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    buf = io.BytesIO()
    Image.fromarray(smooth_image(20, 120, 120)).save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not a png\n")
    Image.fromarray(smooth_image(21, 8, 8)).save(root / "tiny.png")
    Image.fromarray(smooth_image(22, 400, 40)).save(root / "sliver.png")
    Image.fromarray(np.full((100, 100, 3), 128, np.uint8)).save(root / "uniform.png")
    noisy = 128 + np.random.default_rng(23).integers(-1, 2, (100, 100, 3))
    Image.fromarray(noisy.astype(np.uint8)).save(root / "nearly_uniform.png")
    write_png_bomb(root / "bomb.png")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(smooth_image(24, 64, 64)).save(root / ".hidden.png")
    os.symlink(root, root / "loop", target_is_directory=True)  # a symlink loop
    return root


def build_eval_folder(root: Path, messy: Path) -> Path:
    """Eval images: one with the pixels of the pool's c.bmp (saved as PNG), one unrelated."""
    root.mkdir(parents=True, exist_ok=True)
    with Image.open(messy / EVAL_TWIN) as im:
        im.save(root / "twin_of_c.png")
    Image.fromarray(smooth_image(99, 100, 100)).save(root / "other.png")
    return root


# ---------------------------------------------------------------- tests

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dinoflow.curation import curation_config  # noqa: E402
from dinoflow.data import Split, list_image_folder  # noqa: E402


def _split(root: Path, name: str) -> Split:
    paths, _, _ = list_image_folder(root)
    return Split(
        ids=[p.relative_to(root).as_posix() for p in paths],
        labels=np.full(len(paths), -1, dtype=np.int64),
        class_names=[], channels=3, paths=paths, name=name,
    )  # fmt: skip


def _cfg(tmp: Path, **over) -> object:
    params = {
        "show_progress": False,
        "validation": {"docs_dir": str(tmp / "report" / "gx_docs")},
        "sampling": {"target_size": 1000, "n_clusters": [4, 2], "resampling_steps": [0, 2]},
        "report": {"dir": str(tmp / "report")},
    }
    params.update(over)
    return curation_config(params)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, run_curation):
    tmp = tmp_path_factory.mktemp("curation")
    messy = build_messy_folder(tmp / "messy")
    evals = build_eval_folder(tmp / "eval", messy)
    splits = {"train": _split(messy, "train"), "val": _split(evals, "val"),
              "test": Split(ids=[], labels=np.zeros(0, np.int64), class_names=[], channels=3,
                            paths=[], name="test")}  # fmt: skip
    return tmp, run_curation(splits, _cfg(tmp).model_dump(), root=str(messy))


def test_bad_files_quarantined_with_reason(curated) -> None:
    _, res = curated
    q = res.quarantine.set_index("item_id")
    for name, reason in BAD.items():
        assert name in q.index, f"{name} not quarantined"
        assert q.loc[name, "reason"] == reason, (name, q.loc[name, "detail"])
    assert "decompression bomb" in q.loc["bomb.png", "detail"]
    assert "900000000" in q.loc["bomb.png", "detail"]
    # the symlink loop neither hangs nor duplicates: every listed item appears once
    assert res.metadata["item_id"].is_unique
    assert not any(i.startswith("loop/") for i in res.metadata["item_id"])


def test_good_and_tricky_files_kept(curated) -> None:
    _, res = curated
    kept = set(res.manifest["item_id"])
    for name in GOOD:
        if name in {"a.png", "b.jpg"}:
            continue  # duplicate pairs: checked below
        assert name in kept, f"{name} dropped: {res.metadata.set_index('item_id').loc[name, 'detail']}"
    meta = res.metadata.set_index("item_id")
    assert (meta.loc["exif_rot.jpg", "width"], meta.loc["exif_rot.jpg", "height"]) == (60, 100)
    assert meta.loc["anim.gif", "n_frames"] == 3
    assert meta.loc["gray16.png", "mode"].startswith("I")
    assert (meta.loc["cmyk.jpg", "mode"], meta.loc["cmyk.jpg", "channels"]) == ("CMYK", 4)
    assert meta.loc["rgba.png", "channels"] == 4


def test_one_of_each_duplicate_pair_survives(curated) -> None:
    _, res = curated
    kept = set(res.manifest["item_id"])
    reasons = res.metadata.set_index("item_id")["reason"]
    for first, second in DUP_PAIRS:
        assert (first in kept) + (second in kept) == 1, (first, second)
    assert reasons["a_copy.bmp"] == "exact_duplicate" or reasons["a.png"] == "exact_duplicate"
    assert "near_duplicate" in {reasons["b.jpg"], reasons["b_recompressed.jpg"]}


def test_eval_duplicate_removed_and_reported(curated) -> None:
    tmp, res = curated
    meta = res.metadata.set_index("item_id")
    assert meta.loc[EVAL_TWIN, "reason"] == "eval_duplicate"
    assert meta.loc[EVAL_TWIN, "dup_of"] == "twin_of_c.png"
    assert res.report["removed_as_eval_duplicates"] == 1
    assert res.report["removed_as_eval_duplicates_by_split"] == {"val": 1}


def test_manifest_counts_and_report_files(curated) -> None:
    tmp, res = curated
    # 23 listed pool files: 8 bad + 1 exact + 1 near duplicate + 1 eval twin dropped -> 12 kept
    assert (res.metadata["split"] == "train").sum() == 23
    assert len(res.manifest) == 23 - 8 - 3 == 12
    assert list(res.manifest.columns) == ["item_id", "label", "cluster"]
    assert (res.manifest["label"] == -1).all() and (res.manifest["cluster"] >= 0).all()
    funnel = {s["stage"]: s["removed"] for s in res.report["funnel"]}
    assert funnel["unreadable"] == 3 and funnel["low_information"] == 2
    assert res.report["counts"]["skipped_files"] == {"hidden": 1, "not_an_image": 1}
    report = tmp / "report"
    for f in ["funnel.png", "duplicate_components.png",
              "eval_duplicates.png", "cluster_balance.png", "gx_docs/index.html"]:  # fmt: skip
        assert (report / f).is_file(), f
    warned = {c["kwargs"].get("column"): c["success"] for c in res.report["validation"]["checks"]
              if c["severity"] == "warning"}  # fmt: skip
    assert warned["readable"] is False and warned["min_side"] is False
    # per stage: seconds and worker processes (ingest: every usable core by default)
    timings = res.report["timings_s"]
    assert set(timings) == {"ingest", "validate", "quality", "embed", "deduplicate", "sampling"}
    assert timings["ingest"]["workers"] >= 1 and timings["ingest"]["images"] == len(res.metadata)
    assert all(t["seconds"] >= 0 for t in timings.values())


def test_kedro_pipeline_runs_on_messy_folder(tmp_path: Path) -> None:
    """The Kedro nodes end to end (image_folder source, splits carved by the data module)."""
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    from dinoflow.pipelines.curation.pipeline import create_pipeline

    messy = build_messy_folder(tmp_path / "messy")
    params = _cfg(tmp_path).model_dump()
    data = {"source": "image_folder", "path": str(messy), "val_size": 2, "test_fraction": 0.1,
            "seed": 0, "allow_download": False}  # fmt: skip
    catalog = DataCatalog({"params:data": MemoryDataset(data), "params:curation": MemoryDataset(params)})
    outputs = ["curated_manifest", "quarantine", "curation_report"]
    for name in outputs:
        catalog[name] = MemoryDataset()
    SequentialRunner().run(create_pipeline(), catalog)
    manifest, quarantine = catalog.load("curated_manifest"), catalog.load("quarantine")
    assert isinstance(manifest, pd.DataFrame) and len(manifest) > 5
    q = quarantine.set_index("item_id")
    for name, reason in BAD.items():
        assert q.loc[name, "reason"] == reason
    assert not set(manifest["item_id"]) & set(BAD)
