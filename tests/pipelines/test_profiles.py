"""The profiles for the data and the hardware: conf/base (Fashion-MNIST on a CPU), conf/photos
(photo folders on a CPU), conf/gpu (a GPU node), conf/smoke (tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoflow.config import ConfigError, DataConfig, PretrainConfig, validate

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted(Path("/usr/share/backgrounds").glob("*.jpg"))


def profile(env: str) -> dict:
    """The parameters Kedro merges for ``--env env`` (conf/base under it, soft merge)."""
    from kedro.config import OmegaConfigLoader

    loader = OmegaConfigLoader(str(REPO / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft"})
    return loader["parameters"]


@pytest.mark.parametrize("env", ["base", "smoke", "photos", "gpu"])
def test_every_profile_validates(env: str) -> None:
    params = profile(env)
    validate(PretrainConfig, params["pretrain"], f"conf/{env}")
    data = dict(params["data"])
    if env in ("photos", "gpu"):  # a folder profile: refused without the folder
        assert data["source"] == "image_folder" and data["path"] is None
        with pytest.raises(ConfigError, match=r"data\.path is required"):
            validate(DataConfig, data, "data")
        data["path"] = "/data/photos"
    validate(DataConfig, data, "data")


def test_gpu_profile_puts_every_stage_on_the_training_device(monkeypatch) -> None:
    """With a GPU visible, every device of conf/gpu resolves to this process's GPU, the one
    training uses (LOCAL_RANK's); none stays on the CPU."""
    from dinoflow.distributed import resolve_device

    params = profile("gpu")
    devices = {
        "pretrain.train.device": params["pretrain"]["train"]["device"],
        "evaluation.device": params["evaluation"]["device"],
        "curation.embedding.device": params["curation"]["embedding"]["device"],
        "embed.device": params["embed"]["device"],
        "export.device": params["export"]["device"],
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    resolved = {key: resolve_device(value, key) for key, value in devices.items()}
    assert set(resolved.values()) == {torch.device("cuda", 3)}, resolved
    assert params["pretrain"]["train"]["num_workers"] == "auto"
    # on a CPU-only machine the same profile runs on the CPU, every stage alike
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {resolve_device(v, k) for k, v in devices.items()} == {torch.device("cpu")}


def test_gpu_env_without_a_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    kedro = Path(sys.executable).with_name("kedro")
    def outputs() -> list[Path]:  # the pipelines' layers (data/01_raw .. data/09_slurm)
        return sorted(p for p in (REPO / "data").glob("0*/**/*") if p.is_file())

    before = outputs()
    proc = subprocess.run([str(kedro), "run", "--env", "gpu", "--pipelines=pretrain"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "data.path is required with data.source=image_folder" in out
    assert "Traceback" not in out
    assert outputs() == before


@pytest.mark.skipif(len(PHOTOS) < 4, reason="needs the Debian wallpaper packages' photos")
def test_the_fashion_mnist_profile_warns_once_on_photos(tmp_path: Path, caplog) -> None:
    from dinoflow.data import load_splits
    from dinoflow.jobs.pretrain import warn_if_images_dwarf_the_crops

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in PHOTOS[:6]:
        shutil.copy(p, folder / p.name)
    train = load_splits("image_folder", str(folder), val_size=1, test_fraction=0.2)["train"]
    base = PretrainConfig.model_validate(profile("base")["pretrain"])
    with caplog.at_level("WARNING"):
        message = warn_if_images_dwarf_the_crops(train, base)
    assert message is not None and "--env photos" in message and "28-px" in message
    assert [r.getMessage() for r in caplog.records if "--env photos" in r.getMessage()] == [message]
    # the photo profile's own crops are not a small-image profile: no warning there
    photos = PretrainConfig.model_validate(profile("photos")["pretrain"])
    assert warn_if_images_dwarf_the_crops(train, photos) is None


def test_small_images_do_not_warn(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from dinoflow.data import load_splits
    from dinoflow.jobs.pretrain import warn_if_images_dwarf_the_crops

    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    train = load_splits("image_folder", str(folder), val_size=1, test_fraction=0.2)["train"]
    base = PretrainConfig.model_validate(profile("base")["pretrain"])
    assert warn_if_images_dwarf_the_crops(train, base) is None
