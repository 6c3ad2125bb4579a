"""How conf/photos was chosen: its axes compared at equal wall-clock time on real photos.

Every variant is conf/photos with one setting changed (global crop resolution, patch size, local
crops, batch size), pretrained for the same ``--minutes`` of wall-clock time
(``pretrain.train.time_budget_min``: as many steps as fit, the schedules fitted to them) on the
curated folder of ``experiments.real_photos`` (run ``real_photos folder`` and ``real_photos run``
first: this reuses its curated manifest and image cache), then measured label-free on the photos
training never saw (their non-overlapping tiles and their overlapping crops), beside each
variant's random-init twin. A laptop user has a time budget, not a step budget: equal time is the
comparison that decides a profile.

    python -m experiments.photo_profile --minutes 6
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from experiments.own_images.__main__ import kedro_run, scratch_project
from experiments.real_photos import measure_backbone

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments/results/photo_profile.json"

# name -> the --params that differ from conf/photos
VARIANTS: dict[str, list[str]] = {
    "conf/photos (64/32 px, patch 8, 4 local, batch 32)": [],
    "96/48-px crops (12 x 12 patches)": [
        "pretrain.crops.global_size=96", "pretrain.crops.local_size=48", "data.cache.short_side=192"],
    "patch 4 (16 x 16 patches)": ["pretrain.backbone.patch_size=4"],
    "2 local crops": ["pretrain.crops.n_local=2"],
    "8 local crops": ["pretrain.crops.n_local=8"],
    "batch 64 (lr x sqrt 2)": ["pretrain.train.batch_size=64", "pretrain.optim.base_lr=0.0014"],
}


def prepare_project(workdir: Path) -> Path:
    """A scratch project beside ``real_photos``'s with its curated manifest and image cache."""
    source = workdir / "project"
    if not (source / "data/03_primary/curated_manifest.csv").is_file():
        raise SystemExit(f"no curated folder in {source}: run `python -m experiments.real_photos "
                         "folder` and `... run` first")
    project = scratch_project(workdir / "profile_project")
    for part in ("02_intermediate", "03_primary"):
        if not (project / "data" / part).exists():
            shutil.copytree(source / "data" / part, project / "data" / part)
    return project


def build_cache(project: Path, photos: Path, short_side: int) -> None:
    """The image cache at ``short_side`` (curation builds it; only pretraining runs here)."""
    import os

    from dinoflow.config import DataConfig
    from dinoflow.data.cache import build_for_data

    here = Path.cwd()
    os.chdir(project)  # the cache folder in conf is relative to the project
    try:
        build_for_data(DataConfig(source="image_folder", path=str(photos),
                                  cache={"short_side": short_side}), progress=False)
    finally:
        os.chdir(here)


def run_variant(project: Path, photos: Path, params: list[str], minutes: float) -> dict:
    short_side = next((int(p.split("=")[1]) for p in params if p.startswith("data.cache.")), None)
    if short_side is not None:
        build_cache(project, photos, short_side)
    shutil.rmtree(project / "data/06_models", ignore_errors=True)  # each variant from scratch
    all_params = [f"data.path={photos}", f"pretrain.train.time_budget_min={minutes}",
                  "pretrain.train.epochs=200", *params]
    seconds = kedro_run(project, ["--env", "photos", "--pipelines=pretrain", "--params",
                                  ",".join(all_params)], project / "pretrain.log")
    summary = json.loads((project / "data/06_models/pretrain_summary.json").read_text())
    return {"params": params, "seconds": round(seconds), "steps": summary["steps"],
            "images_per_second": summary.get("images_per_second"),
            **measure_backbone(project, photos.parent)}


def table(results: dict) -> str:
    lines = ["| variant | steps | images/s | tiles RankMe (x random) | tiles view top-1 (x random) "
             "| crops RankMe (x) | crops view top-1 (x) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t, c = r["held_out_tiles"], r["held_out"]
        lines.append(
            f"| {name} | {r['steps']} | {r['images_per_second']:.1f} "
            f"| {t['pretrained']['rankme']:.1f} ({t['ratio']['rankme']:.1f}x) "
            f"| {t['pretrained']['view_retrieval_top1']:.3f} ({t['ratio']['view_retrieval_top1']:.1f}x) "
            f"| {c['ratio']['rankme']:.1f}x | {c['ratio']['view_retrieval_top1']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "data/10_experiments/real_photos")
    parser.add_argument("--minutes", type=float, default=6.0)
    args = parser.parse_args()
    project = prepare_project(args.workdir)
    results = json.loads(RESULTS.read_text())["variants"] if RESULTS.is_file() else {}
    for name, params in VARIANTS.items():
        if name in results:  # resumable: a finished variant is kept
            continue
        start = time.perf_counter()
        results[name] = run_variant(project, args.workdir / "photos", params, args.minutes)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        RESULTS.write_text(json.dumps({"minutes": args.minutes, "variants": results}, indent=1))
    print(table(results))
    RESULTS.with_suffix(".md").write_text(
        f"# conf/photos axes at equal time ({args.minutes:g} min of pretraining each)\n\n"
        f"{table(results)}\n")


if __name__ == "__main__":
    main()
