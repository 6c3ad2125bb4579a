"""Shared test settings: the test machine has 2 cores shared with other workers."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# No telemetry leaves the machine, in tests as everywhere.
for _var, _value in {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                     "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ[_var] = _value

# The venv's console scripts (kedro, dvc, mlflow) are found even when pytest runs as
# `.venv/bin/python -m pytest` without an activated venv (as `make test` and CI do).
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

torch.set_num_threads(1)


def pytest_report_header(config) -> str:
    """The CPU kind in every test log: runs are compared per kind (AVX2, AVX512-BF16, AMX)."""
    from dinoflow.precision import cpu_bf16_units

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 "unknown CPU")
    return (f"cpu: {model}, {os.cpu_count()} cores; torch kernels: "
            f"{torch.backends.cpu.get_cpu_capability()}; bf16 units: {cpu_bf16_units()}")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    """Every test gets its own MLflow store: the repo's mlflow.db and mlruns/ stay untouched."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    # mlflow.set_experiment remembers the experiment's id (a module global and
    # MLFLOW_EXPERIMENT_ID) across stores: an earlier test's id is no experiment of this store
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture
def seed() -> int:
    """Seed torch and numpy globally; returns the seed."""
    torch.manual_seed(0)
    np.random.seed(0)
    return 0


@pytest.fixture(scope="session")
def camera_photos() -> list[Path]:
    """Real camera photos (the JPEGs of Debian's wallpaper packages whose EXIF names a camera,
    1-9 megapixels, baseline and progressive), smallest file first."""
    from benchmarks.common import camera_photos as find

    photos = [p for p in find() if p.stat().st_size < 9_000_000]
    if len(photos) < 4:
        pytest.skip(
            "fewer than 4 camera photos under /usr/share/backgrounds and "
            "/usr/share/wallpapers (apt-get install mate-backgrounds "
            "plasma-workspace-wallpapers)"
        )
    return sorted(photos, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="session")
def fmnist_splits():
    """The real Fashion-MNIST splits (from the Debian package or data/01_raw)."""
    from dinoflow.data import load_splits

    return load_splits(allow_download=False)


def _run_curation(splits: dict, params: dict, root: str | None = None):
    """The Kedro curation pipeline on given splits (an in-memory catalog, from_inputs
    ``curation_splits``): -> namespace(manifest, quarantine, report, metadata, embeddings)."""
    from types import SimpleNamespace

    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    from dinoflow.pipelines.curation.pipeline import create_pipeline

    class Kept(MemoryDataset):  # the runner releases intermediate datasets; keep these
        def _release(self) -> None:
            pass

    for split in splits.values():
        split.extra["root"] = root
    kept = ("curated_manifest", "quarantine", "curation_report", "curation_metadata",
            "curation_embeddings")
    catalog = DataCatalog({"params:curation": MemoryDataset(params),
                           "curation_splits": MemoryDataset(splits, copy_mode="assign"),
                           **{name: Kept(copy_mode="assign") for name in kept}})
    SequentialRunner().run(create_pipeline().from_inputs("curation_splits"), catalog)
    got = {name: catalog.load(name) for name in kept}
    return SimpleNamespace(manifest=got["curated_manifest"], quarantine=got["quarantine"],
                           report=got["curation_report"], metadata=got["curation_metadata"],
                           embeddings=got["curation_embeddings"])


def _project_copy(root: Path) -> Path:
    """A Kedro project at ``root`` that runs the installed dinoflow: conf/ (without local/),
    pyproject.toml, an empty src/ (Kedro checks it exists) and the data layers."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    root.mkdir(parents=True)
    shutil.copytree(repo / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(repo / "pyproject.toml", root / "pyproject.toml")
    (root / "src").mkdir()
    for layer in ("03_primary", "06_models", "07_model_output", "08_reporting"):
        (root / "data" / layer).mkdir(parents=True)
    return root


def _real_photo(width: int, height: int):
    """A width x height RGB PIL image cut from the centre of a real photo (the Debian wallpapers
    in /usr/share/backgrounds), the photo first shrunk to about twice that size so the crop holds
    a scene; the test is skipped when none is installed."""
    from PIL import Image

    photos = sorted(Path("/usr/share/backgrounds").glob("*.jpg"))
    if not photos:
        pytest.skip("no photo in /usr/share/backgrounds (Debian wallpaper packages not installed)")
    with Image.open(photos[0]) as im:
        scale = min(1.0, max(2 * width / im.width, 2 * height / im.height))  # covers 2w x 2h
        size = (round(im.width * scale), round(im.height * scale))
        im.draft("RGB", size)  # JPEG: decode at a reduced scale, much faster
        im = im.convert("RGB").resize(size, Image.BILINEAR)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    if left < 0 or top < 0:
        pytest.skip(f"{photos[0]} is smaller than {width}x{height}")
    return im.crop((left, top, left + width, top + height))


# --------------------------------------------------------------------------- factory fixtures
@pytest.fixture(scope="session")
def run_curation():
    """The factory ``run_curation(splits, params, root=None)``: the Kedro curation pipeline on
    given splits -> namespace(manifest, quarantine, report, metadata, embeddings)."""
    return _run_curation


@pytest.fixture(scope="session")
def project_copy():
    """The factory ``project_copy(root) -> root``: a Kedro project at ``root`` that runs the
    installed dinoflow (conf/ without local/, pyproject.toml, an empty src/, the data layers)."""
    return _project_copy


@pytest.fixture(scope="session")
def real_photo():
    """The factory ``real_photo(width, height) -> PIL image``: a crop of a real photo (the test is
    skipped when none is installed)."""
    return _real_photo


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A tmp SQLite MLflow store with the ``dinoflow`` experiment; cwd = tmp_path so run
    artifacts land there too."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("dinoflow")
    yield uri
    mlflow.set_tracking_uri(None)
