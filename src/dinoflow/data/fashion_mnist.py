"""Fashion-MNIST from its IDX files, found locally or downloaded with a checksum check.

Lookup order: ``data/01_raw/fashion-mnist/``, then the Debian/Ubuntu package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``), then the canonical address.
Files may be gzipped or not. The check is on the decompressed bytes, so a re-compressed copy of
the same data (as Debian ships) passes, and a corrupt or different file does not.
"""

from __future__ import annotations

import gzip
import hashlib
import urllib.request
from pathlib import Path

import numpy as np

from dinoflow.errors import UserError
from dinoflow.files import atomic_write_bytes

CANONICAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEFAULT_LOCAL_DIR = Path("data/01_raw/fashion-mnist")
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# sha256 of the decompressed IDX payloads.
FILES = {
    "train_images": (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train_labels": (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test_images": (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


class FashionMNISTNotFound(UserError, FileNotFoundError):
    """No usable copy of Fashion-MNIST in any of the three places."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def parse_idx(payload: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX payload (the MNIST format: magic, dims, big-endian uint8 data)."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise ValueError(f"{source}: not an IDX file (bad magic number)")
    dtype_code, ndim = payload[2], payload[3]
    if dtype_code != 0x08:
        raise ValueError(f"{source}: IDX data type {dtype_code:#x} is not unsigned byte")
    dims = [int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(payload) - offset != expected:
        raise ValueError(
            f"{source}: IDX header says {dims} ({expected} bytes) but holds {len(payload) - offset}"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=offset).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def _candidate(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _verified_dir(directory: Path) -> tuple[Path | None, str]:
    """Return (directory, "") if all four files exist there and match, else (None, why)."""
    for stem, sha in FILES.values():
        path = _candidate(directory, stem)
        if path is None:
            return None, f"{directory}: {stem}[.gz] missing"
        digest = hashlib.sha256(_read_bytes(path)).hexdigest()
        if digest != sha:
            return (
                None,
                f"{path}: checksum mismatch (sha256 {digest[:12]}..., expected {sha[:12]}...)",
            )
    return directory, ""


def download_fashion_mnist(
    target: Path, base_url: str = CANONICAL_URL, timeout: float = 30.0
) -> Path:
    """Download the four files into ``target`` and verify them; nothing partial is left behind."""
    for stem, sha in FILES.values():
        url = f"{base_url}{stem}.gz"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()  # 30 MB at most: verified in memory, then written at once
        digest = hashlib.sha256(
            gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
        ).hexdigest()
        if digest != sha:
            raise ValueError(f"{url}: checksum mismatch after download")
        atomic_write_bytes(target / f"{stem}.gz", payload)
    return target


def find_fashion_mnist(
    local_dir: str | Path = DEFAULT_LOCAL_DIR,
    system_dir: str | Path = SYSTEM_DIR,
    allow_download: bool = True,
    base_url: str = CANONICAL_URL,
) -> Path:
    """The directory holding verified Fashion-MNIST IDX files, by the contract's three lookups."""
    reasons = []
    for directory in (Path(local_dir), Path(system_dir)):
        found, why = _verified_dir(directory)
        if found:
            return found
        reasons.append(why)
    if allow_download:
        try:
            return download_fashion_mnist(Path(local_dir), base_url)
        except Exception as exc:  # noqa: BLE001 - any network failure ends in the one message below
            reasons.append(f"download from {base_url} failed: {exc}")
    else:
        reasons.append("download disabled")
    raise FashionMNISTNotFound(
        "Fashion-MNIST not found. dinoflow looks in three places:\n"
        f"  1. {local_dir}/ (put the four IDX files there, gzipped or not)\n"
        f"  2. {system_dir}/ (Debian/Ubuntu: apt-get install dataset-fashion-mnist)\n"
        f"  3. a download from {base_url} with a checksum check\n"
        "What each gave:\n  - " + "\n  - ".join(reasons)
    )


def load_fashion_mnist(directory: Path) -> dict[str, np.ndarray]:
    """The four arrays: train_images (60000, 28, 28) uint8, train_labels, test_images, test_labels."""
    return {key: read_idx(_candidate(directory, stem)) for key, (stem, _) in FILES.items()}
