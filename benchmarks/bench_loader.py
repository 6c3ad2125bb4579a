"""Benchmark (not a test): the training loader on real photos, and what the image cache buys.

    python -m benchmarks.bench_loader --threads 2

Photos: the JPEGs under /usr/share/backgrounds and /usr/share/wallpapers whose EXIF names a
camera maker and that hold at least a megapixel (Debian's wallpaper packages: 2-5K camera
photos, baseline and progressive), copied into a temporary folder; beside them, 640 x 480 JPEGs
cut from the same photos. Measured in one process:

- decode ms per file: ``decode_file`` full against reduced (``min_side``: libjpeg's 1/2 to 1/8
  scaling), baseline and progressive JPEGs apart;
- the cache build (``build_image_cache``, ``--short-side``) in images/s;
- loader images/s: ``build_loader`` of the ViT-S/14 profile (multi-crop views and masks, RGB)
  over the train split ``load_data`` gives, with 0, 1 and 2 worker processes, without and
  with ``data.cache``, on the photos and on the 640 x 480 files;
- the loop: the same loader feeding the ViT-S/14 profile's eager training step (``--threads``
  torch threads): images/s with 0, 1 and 2 workers, what ``num_workers: auto`` chooses from on
  a CPU (``dinoflow.training.resolve_num_workers``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_step import DinoflowStep, make_batches, profile_config
from benchmarks.common import camera_photos, cpu_model, machine_info
from dinoflow.config import DataConfig, PretrainConfig
from dinoflow.data import Split, load_data
from dinoflow.data.cache import build_image_cache
from dinoflow.data.decode import decode_file
from dinoflow.training import build_loader

WORKERS = (0, 1, 2)


def make_folders(photos: list[Path], tmp: Path) -> dict[str, Path]:
    """{"photos": the photos copied, "640x480": three 640 x 480 JPEGs (q90) cut from each}."""
    from PIL import Image, ImageOps

    roots = {"photos": tmp / "photos", "640x480": tmp / "640x480"}
    for root in roots.values():
        root.mkdir(parents=True)
    for k, path in enumerate(photos):
        shutil.copy(path, roots["photos"] / f"{k:03d}.jpg")
        with Image.open(path) as im:
            im.draft("RGB", (1280, 1280))  # cut from a 1/2 to 1/4 view: whole objects, not pixels
            im = ImageOps.exif_transpose(im).convert("RGB")
        for j in range(3):
            x = (im.width - 640) * j // 2
            y = (im.height - 480) // 2
            im.crop((x, y, x + 640, y + 480)).save(
                roots["640x480"] / f"{k:03d}_{j}.jpg", quality=90
            )
    return roots


def bench_decode(photos: list[Path], min_side: int, repeats: int) -> dict:
    """Median ms per file of a full and a reduced decode, baseline and progressive apart."""
    from PIL import Image

    out: dict = {"min_side": min_side}
    for kind in ("baseline", "progressive"):
        chosen = []
        for path in photos:
            with Image.open(path) as im:
                if bool(im.info.get("progressive")) == (kind == "progressive"):
                    chosen.append(path)
        if not chosen:
            continue
        ms = {"full": [], "reduced": []}
        for _ in range(repeats):
            for path in chosen:
                for mode, side in (("full", None), ("reduced", min_side)):
                    t0 = time.perf_counter()
                    decode_file(path, min_side=side)
                    ms[mode].append(1000 * (time.perf_counter() - t0))
        full, reduced = statistics.median(ms["full"]), statistics.median(ms["reduced"])
        out[kind] = {"files": len(chosen), "full_ms": full, "reduced_ms": reduced,
                     "speedup": full / reduced}  # fmt: skip
    return out


def _rate(cfg: PretrainConfig, train: Split, workers: int, batches: int, step=None) -> float:
    """Images/s of the ``batches`` batches (and steps) after the first: the steady state of a
    run; the first batch holds the workers' start-up (~2 s on 2 cores with the model built)."""
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers})})
    loader = build_loader(
        cfg, train, [0.5] * 3, [0.25] * 3, 0, 1, 0, batches + 1, torch.device("cpu")
    )
    t0, images = 0.0, 0
    for i, batch in enumerate(loader):
        if step is not None:
            step(batch, i)
        if i == 0:
            t0 = time.perf_counter()
        else:
            images += batch["batch_size"]
    return images / (time.perf_counter() - t0)


def _split(root: Path, short_side: int | None, cache_dir: Path) -> Split:
    data = DataConfig(source="image_folder", path=str(root), val_size=0.01, test_fraction=0.01,
                      cache={"short_side": short_side, "dir": str(cache_dir)})  # fmt: skip
    return load_data(data)["train"]


def bench_loaders(
    roots: dict[str, Path],
    cfg: PretrainConfig,
    short_side: int,
    batches: int,
    loop_batches: int,
    tmp: Path,
) -> dict:
    """Cache builds, loader images/s and loop images/s per folder, cache and worker count."""
    out: dict = {}
    step = DinoflowStep(cfg, channels=3)
    step(make_batches(cfg, 3, 1)[0], 0)  # warm-up: first-call allocations out of the timing
    for name, root in roots.items():
        paths = sorted(root.iterdir())
        report = build_image_cache(
            paths,
            root,
            short_side,
            tmp / "cache" / f"short{short_side}",
            workers="auto",
            progress=False,
        )
        res: dict = {"files": len(paths), "cache_build_images_per_s": len(paths) / report.seconds}
        for cached in (False, True):
            train = _split(root, short_side if cached else None, tmp / "cache")
            key = "cache" if cached else "original"
            for w in WORKERS:
                print(f"loader benchmark: {name}, {key}, {w} workers", file=sys.stderr, flush=True)
                res[f"loader_{key}_w{w}"] = _rate(cfg, train, w, batches)
                if name == "photos":
                    res[f"loop_{key}_w{w}"] = _rate(cfg, train, w, loop_batches, step)
        out[name] = res
    return out


def bench(
    threads: int, short_side: int = 512, batches: int = 12, loop_batches: int = 6, repeats: int = 2
) -> dict:
    """The whole benchmark on the camera photos found here (None of it without them)."""
    torch.set_num_threads(threads)
    photos = camera_photos()
    result: dict = {
        "cpu": cpu_model(),
        "threads": threads,
        "short_side": short_side,
        "n_photos": len(photos),
    }
    if len(photos) < 4:
        result["skipped"] = "fewer than 4 camera photos under /usr/share/{backgrounds,wallpapers}"
        return result
    cfg, _ = profile_config("vit_s14")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})})
    result["decode"] = bench_decode(photos, 224, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        roots = make_folders(photos, Path(tmp))
        result.update(bench_loaders(roots, cfg, short_side, batches, loop_batches, Path(tmp)))
    return result


def markdown(r: dict) -> str:
    """The benchmark's lines of the results table."""
    if "skipped" in r:
        return f"Loader: skipped ({r['skipped']})."
    lines = [
        f"Loader ({r['cpu']}, {r['threads']} threads; {r['n_photos']} camera photos, the "
        f"ViT-S/14 profile's loader, cache short side {r['short_side']} px): images/s for "
        "0 / 1 / 2 workers"
    ]
    for kind in ("baseline", "progressive"):
        d = r["decode"].get(kind)
        if d:
            lines.append(
                f"- decode, {d['files']} {kind} JPEGs: full {d['full_ms']:.1f} ms, "
                f"reduced (shorter side >= {r['decode']['min_side']}) "
                f"{d['reduced_ms']:.1f} ms: **{d['speedup']:.1f}x**"
            )
    for name in ("photos", "640x480"):
        res = r[name]
        for kind in ("loader", "loop"):
            if f"{kind}_original_w0" not in res:
                continue
            orig = " / ".join(f"{res[f'{kind}_original_w{w}']:.1f}" for w in WORKERS)
            cache = " / ".join(f"{res[f'{kind}_cache_w{w}']:.1f}" for w in WORKERS)
            gain = res[f"{kind}_cache_w0"] / res[f"{kind}_original_w0"]
            lines.append(
                f"- {kind} on {name} ({res['files']} files): originals {orig}; cache "
                f"{cache}; cache / originals at 0 workers **{gain:.1f}x**"
            )
        lines.append(f"- cache build, {name}: {res['cache_build_images_per_s']:.1f} images/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--batches", type=int, default=12, help="timed loader batches")
    ap.add_argument("--loop-batches", type=int, default=6, help="timed training steps")
    args = ap.parse_args(argv)
    result = {
        "machine": machine_info(args.threads),
        **bench(args.threads, args.short_side, args.batches, args.loop_batches),
    }
    print(json.dumps(result, indent=1))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
