"""How conf/photos was chosen: its axes compared at equal wall-clock time on real photos.

Every variant is conf/photos with one setting changed (global crop resolution, patch size, local
crops, batch size). A laptop user has a time budget, not a step budget: each variant trains the
steps that fit in the same ``--minutes``. Its compiled training step, fed by the real loader from
the image cache, is timed first (``TIMED_STEPS`` after ``WARM_STEPS``, in this process); then
the fixed-length run of that many steps (``kedro run --env photos --pipelines=pretrain``, the
schedules built for it) trains on the curated folder of ``experiments.real_photos`` (run
``real_photos folder`` and ``real_photos run`` first: this reuses its curated manifest and image
cache), and the teacher is measured label-free on the photos training never saw (their
non-overlapping tiles and their overlapping crops), beside each variant's random-init twin.

    python -m experiments.photo_profile --minutes 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path

import torch

from experiments.own_images.__main__ import kedro_run, scratch_project
from experiments.real_photos import measure_backbone

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments/results/photo_profile.json"
WARM_STEPS, TIMED_STEPS = 12, 40  # compiling and warm-up, then the timed steps

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


def photo_config(project: Path, params: list[str]) -> tuple[dict, dict]:
    """(data, pretrain) parameters of conf/base + conf/photos + ``params`` (as kedro merges them)."""
    import yaml
    from omegaconf import OmegaConf

    from dinoflow.config import deep_merge

    merged: dict = {}
    for env in ("base", "photos"):
        for name in ("parameters_data.yml", "parameters_pretrain.yml"):
            path = project / "conf" / env / name
            if path.is_file():
                merged = deep_merge(merged, yaml.safe_load(path.read_text()) or {})
    merged = deep_merge(merged, OmegaConf.to_container(OmegaConf.from_dotlist(params)))
    return merged["data"], merged["pretrain"]


def seconds_per_step(project: Path, photos: Path, params: list[str]) -> float:
    """The variant's compiled step fed by its loader from the image cache (built here when the
    variant's cache size is new), timed over ``TIMED_STEPS`` steps after ``WARM_STEPS``."""
    import time

    from dinoflow.config import DataConfig, PretrainConfig
    from dinoflow.data import load_data
    from dinoflow.data.cache import build_for_data
    from dinoflow.methods import DINOv2
    from dinoflow.training import Trainer, build_loader, resolve_num_workers, wrap_for_training

    data, pretrain = photo_config(project, [f"data.path={photos}", *params])
    cpu = torch.device("cpu")
    with contextlib.chdir(project):  # conf's cache folder is relative to the project
        data_cfg = DataConfig.model_validate(data)
        build_for_data(data_cfg, progress=False)
        split = load_data(data_cfg)["train"]
        cfg = resolve_num_workers(PretrainConfig.model_validate(pretrain), split, cpu)
        method = DINOv2(cfg, split.channels, cpu)
        trainer = Trainer(method, cfg, len(split), 1, cpu)
        trainer.pin_precision()
        model = wrap_for_training(method.student, method.teacher, trainer.cfg, 1, cpu, False)
        mean, std = [0.5] * 3, [0.25] * 3  # the speed does not depend on them
        loader = build_loader(trainer.cfg, split, mean, std, 0, 1, 0, WARM_STEPS + TIMED_STEPS, cpu)
        began = 0.0
        for i, batch in enumerate(loader):
            if i == WARM_STEPS:
                began = time.perf_counter()
            trainer.train_mode(model)
            trainer.step(model, batch, batch["step"])
    torch._dynamo.reset()  # the next variant compiles its own graphs
    return (time.perf_counter() - began) / TIMED_STEPS


def run_variant(project: Path, photos: Path, params: list[str], minutes: float) -> dict:
    per_step = seconds_per_step(project, photos, params)
    steps = max(1, int(minutes * 60 / per_step))
    shutil.rmtree(project / "data/06_models", ignore_errors=True)  # each variant from scratch
    all_params = [f"data.path={photos}", f"pretrain.train.epochs={steps / 200!r}",
                  "pretrain.train.steps_per_epoch=200", *params]  # fmt: skip
    seconds = kedro_run(project, ["--env", "photos", "--pipelines=pretrain", "--params",
                                  ",".join(all_params)], project / "pretrain.log")  # fmt: skip
    summary = json.loads((project / "data/06_models/pretrain_summary.json").read_text())
    batch = int(dict(p.split("=") for p in params).get("pretrain.train.batch_size", 32))
    return {**measure_backbone(project, photos.parent), "params": params, "steps": summary["steps"],
            "seconds_per_step": per_step, "images_per_second": batch / per_step,
            "run_seconds": round(seconds)}


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
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args()
    project = prepare_project(args.workdir)
    results = json.loads(RESULTS.read_text())["variants"] if RESULTS.is_file() else {}
    for name, params in VARIANTS.items():
        if name in results and results[name].get("minutes") == args.minutes:  # kept
            continue
        start = time.perf_counter()
        results[name] = {**run_variant(project, args.workdir / "photos", params, args.minutes),
                         "minutes": args.minutes}
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        RESULTS.write_text(json.dumps({"minutes": args.minutes, "variants": results}, indent=1))
    print(table(results))
    RESULTS.with_suffix(".md").write_text(
        f"# conf/photos axes at equal time ({args.minutes:g} min of training steps each)\n\n"
        f"{table(results)}\n")


if __name__ == "__main__":
    main()
