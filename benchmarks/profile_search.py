"""One short run of the CPU-profile search (README "Profiles"): conf/base's pretrain parameters
with JSON overrides, online kNN every 100 steps, printed as it goes.

    python benchmarks/profile_search.py G '{"optim": {"teacher_temp_start": 0.01, "teacher_temp_end": 0.01}}'

The runs of the README table used 700 steps (``{"train": {"epochs": 7, "steps_per_epoch": 100}}``)
at 1 thread, two runs side by side on the 2-core machine; their logs are in
benchmarks/results/profile_search/.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import yaml

from dinoflow.config import DataConfig, PretrainConfig
from dinoflow.workflow import run_pretraining

ROOT = Path(__file__).resolve().parents[1]


def merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict):
            merge(base.setdefault(key, {}), value)
        else:
            base[key] = value
    return base


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    name, overrides = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    params = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    merge(params, {"train": {"epochs": 7, "steps_per_epoch": 100, "threads": 1, "knn_every_epochs": 1}})
    merge(params, overrides)
    merge(params, {"train": {"run_dir": f"/tmp/profile_search/{name}", "progress": False,
                             "resume": False, "checkpoint_every_steps": 100_000},
                   "launcher": {"type": "local"}})
    cfg = PretrainConfig.model_validate(params)
    data = DataConfig.model_validate(
        yaml.safe_load((ROOT / "conf/base/parameters_data.yml").read_text())["data"])
    start = time.time()

    def on_knn(step: int, top1: float) -> None:
        print(f"{name} step {step} t {time.time() - start:.0f}s knn {top1:.4f}", flush=True)

    run_pretraining(data, cfg, on_knn=on_knn)
    print(f"{name} done {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
