"""Shared benchmark helpers: machine description, fp32 matmul rate, peak-RSS sampling, A/B timing.

Timings on a shared machine are noisy, so every comparison runs in one process, interleaves the
contenders (A B, B A, A B, ...) and reports medians and their ratio.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, object]:
    """Machine, threads and library versions a benchmark ran with."""
    import timm

    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "bf16_units": bool(set(cpu_flags()) & {"amx_bf16", "avx512_bf16"}),
        "load_average_1m": os.getloadavg()[0],
    }
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        info["lightly"] = None
    return info


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16", "fma")


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix flags that decide fp32 / bf16 speed (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return []


def matmul_rate(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5,
                dtype: torch.dtype = torch.float32) -> float:
    """Best torch.mm rate (FLOP/s) in ``dtype`` over square sizes and repeats, in this process.

    "Best of" estimates what the cores deliver when not interrupted by other processes, which
    makes the utilisation computed from it conservative.
    """
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: MKL/oneDNN kernel selection, page faults
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        first = time.perf_counter() - t0
        # ~2 GFLOP per timed call, fewer where the kernel is slow (emulated bf16: ~1 GFLOP/s)
        inner = max(1, min(int(2e9 // (2 * n**3)), int(0.5 / max(first, 1e-9))))
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            best = max(best, inner * 2 * n**3 / (time.perf_counter() - t0))
    return best


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS starts from the live memory."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure from where it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident memory while the block runs (a sampling thread; bytes above the start).

    ``with PeakRSS() as m: ...`` then ``m.peak`` (absolute bytes) and ``m.extra`` (peak - start).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        _release_free_memory()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def interleaved_times(contenders: dict[str, Callable[[int], object]], repeats: int,
                      warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each contender, in alternating order.

    ``contenders[name](i)`` runs one unit of work (i = repetition index). Warm-up calls are not
    timed. The order alternates (A B C, C B A, ...) so slow drifts of the machine's load fall
    on every contender alike. CPU time (all threads of this process) is the robust measure on
    a shared machine: other processes' load stretches wall time but not this process's work.
    -> {name: {"wall": [...], "cpu": [...]}}
    """
    names = list(contenders)
    for i in range(warmup):
        for name in names:
            contenders[name](i)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            contenders[name](warmup + r)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def matmul_block(n: int = 1536, flop: float = 2e10,
                 dtype: torch.dtype = torch.float32) -> tuple[Callable[[int], object], float]:
    """(callable, its FLOPs): a fixed amount of n x n torch.mm in ``dtype``, timed like a
    contender so that the matmul rate sees the same machine load as the steps it is compared with."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    reps = max(1, int(flop // (2 * n**3)))

    def run(_: int) -> None:
        for _ in range(reps):
            torch.mm(a, b, out=out)

    return run, float(reps * 2 * n**3)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# Debian's wallpaper packages (mate-backgrounds, plasma-workspace-wallpapers, ...): real photos
PHOTO_FOLDERS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))


def camera_photos(min_pixels: int = 1_000_000) -> list[Path]:
    """The JPEGs of the wallpaper packages that a camera took (EXIF Make), sorted."""
    from PIL import Image

    found: dict[Path, Path] = {}  # the wallpaper folders link to each other: each file once
    for folder in PHOTO_FOLDERS:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg") or not path.is_file():
                continue
            with Image.open(path) as im:
                if im.getexif().get(0x010F) and im.size[0] * im.size[1] >= min_pixels:
                    found.setdefault(path.resolve(), path)
    return sorted(found.values())
