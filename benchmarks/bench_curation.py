"""Benchmark (not a test): dedup + 2-level hierarchical k-means on N synthetic embeddings.

    python -m benchmarks.bench_curation            # 1M x 128: one JSON line, also results/curation.json
    python -m benchmarks.bench_curation --n 100000 # quicker
    python -m benchmarks.bench_curation --ingest   # ingest images/s on 1 and 2 workers (2000 JPEGs)
    python -m benchmarks.bench_curation --ingest --ingest-images 24 --memory-sizes 200 400  # quick

Ingest (``--ingest``): 640x480 JPEGs cut from real camera photos (the Debian wallpapers,
``benchmarks.common.camera_photos``), ingested by ``dinoflow.curation.ingest_run`` (decode,
statistics, hashes, thumbnails, chunks to disk) with 1 and 2 worker processes in one run,
interleaved (1 2, 2 1, ...), each time into an empty work folder: images/s of each, their ratio,
peak RSS of this process and of the largest worker, the CPU named. The fork server is started
before the timing (a tiny 2-worker ingest), as it is once per run in the pipeline. The same on the
camera photos themselves (1-9 megapixels, each copied 4 times: full decodes of real 2-5K photos).
Memory (``--memory-sizes``, default 20000 100000): N small JPEGs (96x72, cut from the photos)
ingested on 2 workers and embedded (pixels + PCA, the default embedder), peak RSS of the main
process and of the whole process tree: flat in N when the thumbnails stream to disk.

Data: a Gaussian mixture with power-law cluster sizes (like web data: a few huge concepts, a long
tail), 1% of the points replaced by near copies of others (cosine ~ 0.999), L2-normalised.
Steps timed: near-duplicate search (faiss IVF, k neighbours, threshold), connected components and
one-per-component selection, hierarchical k-means with resampling, balanced sampling.

Beyond one machine: ``benchmarks.bench_curation_ranks`` runs the same steps as 1 and 2 torchrun
ranks (the design for 1M, 10M and 142M images: docs/curation.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from pathlib import Path

import numpy as np

from dinoflow.curation import dedup as dd
from dinoflow.curation.config import DedupConfig, IngestConfig
from dinoflow.curation.sampling import (
    balance_stats,
    hierarchical_kmeans,
    hierarchical_sample,
    top_level_labels,
)

DECODE_MIN_SIDE = IngestConfig().decode_min_side  # the product's default (256: reduced JPEG decoding)


def rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(n: int, dim: int, n_concepts: int, dup_fraction: float, seed: int) -> np.ndarray:
    """(n, dim) float32 L2-normalised: power-law mixture plus near-duplicate copies."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_concepts + 1) ** 1.1
    sizes = rng.multinomial(n, weights / weights.sum())
    centres = rng.normal(size=(n_concepts, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    start = 0
    for c, s in enumerate(sizes):
        x[start : start + s] = centres[c] + 0.6 * rng.standard_normal((s, dim), dtype=np.float32)
        start += s
    n_dup = int(dup_fraction * n)
    src, dst = rng.choice(n, n_dup, replace=False), rng.choice(n, n_dup, replace=False)
    x[dst] = x[src] + 0.01 * rng.standard_normal((n_dup, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run(args: argparse.Namespace) -> dict:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    out: dict = {"n": args.n, "dim": args.dim, "threads": args.threads}
    t = time.perf_counter()
    x = synthetic(args.n, args.dim, args.concepts, args.dup_fraction, args.seed)
    out["data_seconds"] = time.perf_counter() - t
    out["rss_after_data_mb"] = rss_mb()

    t0 = time.perf_counter()
    cfg = DedupConfig(index="ivf", ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, query_batch=65536)
    src, dst, _ = dd.similarity_edges(x, args.threshold, args.k, cfg, progress=args.progress)
    out["dedup_search_seconds"] = time.perf_counter() - t0
    t = time.perf_counter()
    comp = dd.connected_components(len(x), src, dst)
    keep = dd.representatives(comp, np.zeros(len(x)))
    out["dedup_components_seconds"] = time.perf_counter() - t
    out["dedup_edges"] = len(src)
    out["dedup_removed"] = int((~keep).sum())
    out["dedup_seconds"] = time.perf_counter() - t0

    t = time.perf_counter()
    kept = np.flatnonzero(keep)
    levels = hierarchical_kmeans(
        x[kept], args.clusters, [0, args.resampling_steps], [0, 0], niter=args.iters, seed=args.seed,
        progress=args.progress,
    )  # fmt: skip
    out["kmeans_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    chosen = hierarchical_sample(levels, args.target, "random", args.seed)
    out["sampling_seconds"] = time.perf_counter() - t
    top = top_level_labels(levels)
    out["n_clusters_per_level"] = [len(lvl.centroids) for lvl in levels]
    out["selected"] = len(chosen)
    out["balance_before"] = balance_stats(np.bincount(top))
    out["balance_after"] = balance_stats(np.bincount(top[chosen], minlength=len(levels[-1].centroids)))
    out["seconds"] = out["dedup_seconds"] + out["kmeans_seconds"] + out["sampling_seconds"]
    out["peak_rss_mb"] = rss_mb()
    return out


def ingest_images(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """n JPEGs of ``size`` cut from real camera photos (several crops per photo), in ``folder``."""
    from PIL import Image

    from benchmarks.common import camera_photos

    photos = camera_photos()
    if not photos:
        raise SystemExit("no camera photo: apt-get install mate-backgrounds plasma-workspace-wallpapers")
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    while len(paths) < n:
        with Image.open(photos[k % len(photos)]) as im:
            im = im.convert("RGB")
        w, h = size
        for j in range(4):  # corners, then shifted by the round
            if len(paths) == n:
                break
            x = (j % 2) * max(0, im.width - w) + (k // len(photos)) * 7 % max(1, im.width - w)
            y = (j // 2) * max(0, im.height - h) + (k // len(photos)) * 5 % max(1, im.height - h)
            x, y = min(x, im.width - w), min(y, im.height - h)
            path = folder / f"img_{len(paths):06d}.jpg"
            im.crop((x, y, x + w, y + h)).save(path, quality=90)
            paths.append(path)
        k += 1
    return paths


def run_ingest(args: argparse.Namespace) -> dict:
    """Ingest images/s with 1 and 2 workers on the same 640x480 JPEGs; peak RSS; the CPU."""
    import os
    import tempfile

    from benchmarks.common import PeakRSS, cpu_model, interleaved_times, median
    from dinoflow.curation.ingest_run import IngestSettings, ingest_splits
    from dinoflow.data import Split
    from dinoflow.parallel import usable_cores

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    paths = ingest_images(tmp / "images", args.ingest_images)
    split = Split(ids=[p.name for p in paths], labels=np.full(len(paths), -1), class_names=[],
                  channels=3, paths=paths, name="train")  # fmt: skip
    settings = IngestSettings(thumb_size=16, max_pixels=40_000_000, compute_phash=True, phash_min_side=64,
                              decode_min_side=DECODE_MIN_SIDE)

    def ingest(workers: int, tag: str, splits: dict, per_chunk: int = args.files_per_chunk) -> None:
        work = tmp / f"work-{tag}"
        ingest_splits(splits, settings, work, workers, per_chunk, progress=False)
        for f in sorted(work.rglob("*"), reverse=True):  # an empty folder for the next call
            f.unlink() if f.is_file() else f.rmdir()

    ingest(2, "warm", {"train": split.subset(range(min(2, len(paths))))}, 1)  # start the fork server
    with PeakRSS() as rss:
        times = interleaved_times(
            {f"{w}_workers": (lambda i, w=w: ingest(w, f"{w}-{i}", {"train": split})) for w in (1, 2)},
            repeats=args.repeats, warmup=0,
        )  # fmt: skip
    out: dict = {"benchmark": "curation ingest", "images": len(paths), "image_size": [640, 480],
                 "files_per_chunk": args.files_per_chunk, "repeats": args.repeats,
                 "cpu": cpu_model(), "usable_cores": usable_cores(), "load_average_1m": os.getloadavg()[0]}  # fmt: skip
    for name, t in times.items():
        out[f"{name}_seconds"] = median(t["wall"])
        out[f"{name}_images_per_s"] = len(paths) / median(t["wall"])
    out["speedup_2_vs_1"] = out["2_workers_images_per_s"] / out["1_workers_images_per_s"]
    out["peak_rss_mb"] = rss.peak / 2**20
    out["peak_rss_worker_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out["camera_photos"] = run_camera_photos(tmp, args.repeats, max(1, args.files_per_chunk // 8))
    out["memory"] = run_memory(args.memory_sizes, tmp)
    out["model_embedding"] = run_model_embedding(tmp)
    import shutil

    shutil.rmtree(tmp)
    return out


class TreeRSS:
    """Peak RSS of this process and of the whole process tree (workers, fork server), sampled."""

    def __init__(self, interval_s: float = 0.05):
        import threading

        self.interval_s, self.main = interval_s, 0
        self.tree = 0
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = main = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # ended between the listing and the read
                    total += child.memory_info().rss
            self.main, self.tree = max(self.main, main), max(self.tree, total)
            time.sleep(self.interval_s)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def small_images(folder: Path, n: int, size: tuple[int, int] = (96, 72)) -> list[Path]:
    """n small JPEGs cut on a grid from the camera photos (each photo decoded once, at 1/4)."""
    from PIL import Image

    from benchmarks.common import camera_photos

    photos = []
    for path in camera_photos():
        with Image.open(path) as im:
            im.draft("RGB", (im.width // 4, im.height // 4))
            photos.append(im.convert("RGB"))
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        cols, rows = max(1, (im.width - w) // 13), max(1, (im.height - h) // 11)
        k = i // len(photos)
        x, y = (k % cols) * 13, ((k // cols) % rows) * 11
        paths.append(folder / f"s_{i:06d}.jpg")
        im.crop((x, y, x + w, y + h)).save(paths[-1], quality=90)
    return paths


def run_memory(sizes: list[int], tmp: Path) -> dict:
    """Peak RSS of ingest (2 workers, chunks to disk) and of the pixel embeddings at each N: of
    this process above its RSS at the start of the stage, and of the whole process tree."""
    import gc

    import psutil

    from dinoflow.curation.config import EmbeddingConfig
    from dinoflow.curation.embed import pixel_embeddings
    from dinoflow.curation.ingest_run import IngestSettings, ingest_splits
    from dinoflow.data import Split

    settings = IngestSettings(16, 40_000_000, True, 64, decode_min_side=DECODE_MIN_SIDE)
    out = {}
    for n in sizes:
        paths = small_images(tmp / f"small-{n}", n)
        split = Split(ids=[p.name for p in paths], labels=np.full(n, -1), class_names=[],
                      channels=3, paths=paths, name="train")  # fmt: skip
        gc.collect()
        start, t0 = psutil.Process().memory_info().rss, time.perf_counter()
        with TreeRSS() as ingest:
            meta, thumbs, _ = ingest_splits({"train": split}, settings, tmp / f"work-{n}", 2,
                                            256, progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        embed_start, cfg, everything = psutil.Process().memory_info().rss, EmbeddingConfig(), np.ones(n, bool)
        with TreeRSS() as embed:
            pixel_embeddings(thumbs, everything, everything, cfg.pca_dim, cfg.pca_max_fit, 0)
        out[str(n)] = {"ingest_seconds": round(seconds, 1),
                       "ingest_peak_above_start_mb": round((ingest.main - start) / 2**20, 1),
                       "ingest_peak_tree_mb": round(ingest.tree / 2**20, 1),
                       "embed_peak_above_start_mb": round((embed.main - embed_start) / 2**20, 1),
                       "metadata_table_mb": round(meta.memory_usage(deep=True).sum() / 2**20, 1),
                       "thumbnails_on_disk_mb": round(thumbs.nbytes / 2**20, 1)}  # fmt: skip
        del meta, thumbs
    return out


def run_camera_photos(tmp: Path, repeats: int, per_chunk: int) -> dict:
    """Ingest images/s on 1 and 2 workers on the camera photos at full size (4 copies each),
    decoded in full and reduced (``decode_min_side``, the product's default)."""
    import shutil

    from PIL import Image

    from benchmarks.common import camera_photos, interleaved_times, median
    from dinoflow.curation.ingest_run import IngestSettings, ingest_splits
    from dinoflow.data import Split

    folder = tmp / "camera"
    folder.mkdir()
    paths = []
    for k, photo in enumerate(camera_photos()):
        for copy in range(4):
            paths.append(folder / f"{k:03d}_{copy}{photo.suffix.lower()}")
            shutil.copy(photo, paths[-1])
    split = Split(ids=[p.name for p in paths], labels=np.full(len(paths), -1), class_names=[],
                  channels=3, paths=paths, name="train")  # fmt: skip

    def ingest(workers: int, min_side: int | None, tag: str) -> None:
        settings = IngestSettings(16, 40_000_000, True, 64, decode_min_side=min_side)
        work = tmp / f"camera-work-{tag}"
        ingest_splits({"train": split}, settings, work, workers, per_chunk, progress=False)
        shutil.rmtree(work)

    contenders = {f"{w}_workers_{name}": (lambda i, w=w, m=m, n=name: ingest(w, m, f"{n}{w}-{i}"))
                  for name, m in (("full", None), ("reduced", DECODE_MIN_SIDE)) for w in (1, 2)}  # fmt: skip
    times = interleaved_times(contenders, repeats=repeats, warmup=0)
    megapixels = []
    for p in paths[::4]:
        with Image.open(p) as im:
            megapixels.append(im.width * im.height / 1e6)
    out = {"images": len(paths), "decode_min_side": DECODE_MIN_SIDE,
           "megapixels_min_max": [round(min(megapixels), 1), round(max(megapixels), 1)]}  # fmt: skip
    for name, t in times.items():
        out[f"{name}_images_per_s"] = round(len(paths) / median(t["wall"]), 2)
    for name in ("full", "reduced"):
        out[f"speedup_2_vs_1_{name}"] = round(
            out[f"2_workers_{name}_images_per_s"] / out[f"1_workers_{name}_images_per_s"], 3)
    out["reduced_vs_full_2_workers"] = round(
        out["2_workers_reduced_images_per_s"] / out["2_workers_full_images_per_s"], 3)
    return out


def run_model_embedding(tmp: Path, n: int = 96) -> dict:
    """The model embedder's images/s (ViT-S/14 at 224 px, random init: the cost, not the
    quality), decoded pixels given: curation.embedding defaults on this CPU, all threads."""
    import torch

    from benchmarks.common import cpu_model
    from dinoflow.curation.config import EmbeddingConfig
    from dinoflow.curation.embed import embedding_precision, model_embeddings
    from dinoflow.models.vit import build_backbone, save_backbone

    torch.manual_seed(0)
    save_backbone(build_backbone("vit_small", patch_size=14, img_size=224), tmp / "vit_s14.pt")
    cfg = EmbeddingConfig(kind="dinoflow", checkpoint=str(tmp / "vit_s14.pt"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(8)]
    rows = np.arange(n)
    model_embeddings(cfg, lambda r: images[r % 8], rows[: cfg.batch_size], n, lambda: ([0.5] * 3, [0.25] * 3),
                     progress=False)  # fmt: skip  (warm-up)
    t0 = time.perf_counter()
    model_embeddings(cfg, lambda r: images[r % 8], rows, n, lambda: ([0.5] * 3, [0.25] * 3), progress=False)
    seconds = time.perf_counter() - t0
    model = build_backbone("vit_small", patch_size=14, img_size=224)
    return {"model": "ViT-S/14, 224 px", "images": n, "batch_size": cfg.batch_size,
            "precision": embedding_precision(cfg, model, torch.device("cpu"))[0],
            "threads": torch.get_num_threads(), "images_per_s": round(n / seconds, 1),
            "cpu": cpu_model()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--concepts", type=int, default=2000)
    p.add_argument("--dup-fraction", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.99)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--clusters", type=int, nargs=2, default=[1000, 100])
    p.add_argument("--resampling-steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--target", type=int, default=500_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--ingest", action="store_true", help="the ingest benchmark instead")
    p.add_argument("--ingest-images", type=int, default=2000)
    p.add_argument("--files-per-chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[20_000, 100_000])
    p.add_argument("--out", type=Path, default=None, help="default results/curation.json "
                   "(--ingest: results/curation_ingest.json)")
    args = p.parse_args(argv)
    result = run_ingest(args) if args.ingest else run(args)
    if args.out is None:
        name = "curation_ingest.json" if args.ingest else "curation.json"
        args.out = Path(__file__).resolve().parent / "results" / name
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
