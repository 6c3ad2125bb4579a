"""Real photos end to end: the photo profile (conf/photos) on photographs Debian ships.

1. ``folder``: collects the distinct wallpapers of the Debian packages ukui-wallpapers,
   mate-backgrounds, lomiri-wallpapers-16.04/-20.04, gnome-backgrounds and
   plasma-workspace-wallpapers (real photographs, 1-6K px, plus some renders; identical files
   shipped under several names are kept once), holds out every 8th (by content hash) and cuts
   640x480 (or 480x640) JPEGs from the rest at random positions and scales: ``--images`` training
   files in ``<workdir>/photos``, and the held-out photos' crops in ``<workdir>/held_out``.
2. ``run``: the default pipeline on that folder with conf/photos, exactly as a user runs it
   (``kedro run --env photos --params data.path=<workdir>/photos``), in a scratch project.
3. ``measure``: label-free metrics (RankMe, view retrieval, ...) of the trained backbone and of
   its random-init twin on the held-out photos' crops (photos training never saw).

    python -m experiments.real_photos folder --images 10000
    python -m experiments.real_photos run
    python -m experiments.real_photos measure
    python -m experiments.real_photos pictures   # after `kedro run --env photos --pipelines=embed`
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from experiments.own_images.__main__ import kedro_run, scratch_project

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_SIDE = 720  # smaller files are thumbnails of the same wallpapers
HOLD_OUT_EVERY = 8


def distinct_photos() -> list[Path]:
    """Every wallpaper file once (by content), shorter side >= MIN_SIDE, sorted by hash."""
    from PIL import Image

    found: dict[str, Path] = {}
    for root in SOURCES:
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in SUFFIXES or not path.is_file():
                continue
            with Image.open(path) as im:
                if min(im.size) < MIN_SIDE:
                    continue
            found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path.resolve())
    return [found[h] for h in sorted(found)]


def cut_crops(photo: Path, n: int, out: Path, rng: np.random.Generator, stem: str) -> int:
    """``n`` 640x480 (landscape) or 480x640 (portrait) JPEGs cut at random scales (10-100 % of
    the largest 4:3 window) and positions, written as ``<stem>_<k>.jpg``."""
    from PIL import Image, ImageOps

    with Image.open(photo) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    w, h = rgb.size
    size = (640, 480) if w >= h else (480, 640)
    full = min(w / size[0], h / size[1])  # the largest window of the output's aspect
    for k in range(n):
        s = full * float(np.sqrt(rng.uniform(0.1, 1.0)))
        cw, ch = int(size[0] * s), int(size[1] * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = rgb.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.LANCZOS)
        crop.save(out / f"{stem}_{k:04d}.jpg", quality=90)
    return n


def cut_tiles(photo: Path, out: Path, stem: str, short_side: int = 1440) -> int:
    """The photo at ``short_side`` px cut into non-overlapping 640x480 (or 480x640) tiles: images
    that share no pixel, as distinct as photos of one scene."""
    from PIL import Image, ImageOps

    with Image.open(photo) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    scale = short_side / min(rgb.size)
    rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
    tw, th = (640, 480) if rgb.width >= rgb.height else (480, 640)
    n = 0
    for y in range(0, rgb.height - th + 1, th):
        for x in range(0, rgb.width - tw + 1, tw):
            rgb.crop((x, y, x + tw, y + th)).save(out / f"{stem}_{n:03d}.jpg", quality=90)
            n += 1
    return n


def make_folder(workdir: Path, images: int, held_out_per_photo: int = 40, seed: int = 0) -> dict:
    photos = distinct_photos()
    held = photos[::HOLD_OUT_EVERY]
    train = [p for p in photos if p not in held]
    rng = np.random.default_rng(seed)
    written = {"photos": 0, "held_out": 0}
    for name, sources, per_photo in (("photos", train, -(-images // len(train))),
                                     ("held_out", held, held_out_per_photo)):
        out = workdir / name
        out.mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(sources):
            written[name] += cut_crops(photo, per_photo, out, rng, f"{i:03d}")
    tiles = workdir / "held_out_tiles"  # the held-out photos again, without overlapping crops
    tiles.mkdir(parents=True, exist_ok=True)
    written["held_out_tiles"] = sum(cut_tiles(p, tiles, f"{i:03d}") for i, p in enumerate(held))
    info = {"distinct_photos": len(photos), "train_photos": len(train), "held_out_photos": len(held),
            **written, "sources": [str(p) for p in photos]}
    (workdir / "folder.json").write_text(json.dumps(info, indent=1))
    return info


def run(workdir: Path, extra: list[str]) -> float:
    project = scratch_project(workdir / "project")
    params = ",".join([f"data.path={workdir / 'photos'}", *extra])
    return kedro_run(project, ["--env", "photos", "--params", params], workdir / "run.log")


def measure(workdir: Path) -> dict:
    out = measure_backbone(workdir / "project", workdir)
    (workdir / "measure.json").write_text(json.dumps(out, indent=1))
    return out


def measure_backbone(project: Path, workdir: Path) -> dict:
    """Label-free metrics of ``project``'s teacher backbone and its random-init twin on the
    held-out photos' overlapping crops and non-overlapping tiles, with their ratios."""
    from dinoflow.config import DataConfig
    from dinoflow.data import load_data
    from dinoflow.evaluation.labelfree import label_free_metrics
    from dinoflow.evaluation.tasks.baselines import random_init_like
    from dinoflow.models.vit import DinoVisionTransformer, load_backbone

    summary = json.loads((project / "data/06_models/pretrain_summary.json").read_text())
    backbone = load_backbone(project / summary["teacher_backbone"]).eval()
    factory = partial(DinoVisionTransformer, **backbone.backbone_kwargs())
    nets = {"pretrained": backbone, "random_init": random_init_like(backbone, 0, factory)}
    eval_settings = _photos_eval_settings(project)
    out = {"steps": summary["steps"], "images_per_second": summary.get("images_per_second")}
    for folder in ("held_out", "held_out_tiles"):  # 40 overlapping crops / tiles per photo
        data = DataConfig(source="image_folder", path=str(workdir / folder), val_size=1,
                          test_fraction=0.99)
        held_out = load_data(data)["test"]
        results = label_free_metrics(nets, held_out, int(summary["image_size"]), summary["mean"],
                                     summary["std"], eval_settings.view_settings(),
                                     max_images=2000, seed=0, batch_size=128, progress=False)
        ratios = {k: results["pretrained"][k] / results["random_init"][k]
                  for k in ("rankme", "view_retrieval_top1")}
        out[folder] = {"images": len(held_out), **results, "ratio": ratios}
    return out


def pictures(workdir: Path, size: int = 128) -> list[Path]:
    """PCA maps of patch features on one landscape tile of each of 8 held-out photos (at
    ``size`` px: a 16 x 16 grid at patch 8) and the embed pipeline's neighbours picture on the
    held-out tiles, copied to docs/images/."""
    import shutil

    from PIL import Image

    from dinoflow.evaluation.pictures import pca_feature_maps
    from dinoflow.models.vit import load_backbone

    project = workdir / "project"
    summary = json.loads((project / "data/06_models/pretrain_summary.json").read_text())
    backbone = load_backbone(project / summary["teacher_backbone"]).eval()
    best: dict[str, tuple[float, np.ndarray]] = {}  # per photo: its most detailed tile
    for path in sorted((workdir / "held_out_tiles").glob("*.jpg")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        photo, detail = path.name.split("_")[0], float(rgb.std())
        if rgb.shape[1] > rgb.shape[0] and detail > best.get(photo, (-1.0, None))[0]:
            best[photo] = (detail, rgb)
    by_detail = sorted(best.values(), key=lambda item: -item[0])[:8]
    images = np.stack([rgb for _, rgb in by_detail])
    pca = pca_feature_maps(backbone, images, summary["mean"], summary["std"],
                           ROOT / "docs/images/photos_pca.png", size,
                           title="conf/photos backbone on held-out photos")
    neighbours = ROOT / "docs/images/photos_neighbours.png"
    shutil.copy(project / "data/08_reporting/embed/neighbours.png", neighbours)
    return [pca, neighbours]


def _photos_eval_settings(project: Path):
    import yaml

    from dinoflow.evaluation.report import EvalSettings

    merged: dict = {}
    for env in ("base", "photos"):
        path = project / "conf" / env / "parameters_evaluation.yml"
        if path.is_file():
            merged.update((yaml.safe_load(path.read_text()) or {}).get("evaluation", {}))
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()
              if k not in ("model", "image_size")}
    return EvalSettings(out_dir=project / "unused", **merged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["folder", "run", "measure", "pictures"])
    parser.add_argument("--workdir", type=Path, default=ROOT / "data/10_experiments/real_photos")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--params", default="", help="extra kedro --params, comma-separated")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.what == "folder":
        print(json.dumps({k: v for k, v in make_folder(args.workdir, args.images).items()
                          if k != "sources"}))
    elif args.what == "run":
        extra = [p for p in args.params.split(",") if p]
        print(f"kedro run --env photos: {run(args.workdir, extra):.0f} s")
    elif args.what == "measure":
        print(json.dumps(measure(args.workdir), indent=1))
    else:
        print([str(p) for p in pictures(args.workdir)])
    print(f"{args.what}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
