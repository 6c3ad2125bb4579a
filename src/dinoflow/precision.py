"""bf16 autocast or fp32: what a CPU or GPU has the units for, measured for the shapes at hand.

Training (``train.precision``) and evaluation (``evaluation.precision``) choose with the same
rule: bf16 on CUDA; on a CPU, bf16 only where it has native bf16 matrix units (Intel AMX or
AVX512-BF16) and a short measurement of one MLP layer of the run's own shapes says bf16 is
faster; fp32 otherwise. Weights stay fp32 either way (autocast casts per op).
"""

from __future__ import annotations

import functools
import time

import torch

PRECISIONS = ("fp32", "bf16")
MIN_SPEEDUP = 1.1  # bf16 must be measured at least this much faster to be chosen


def cpu_bf16_units() -> bool:
    """Native bf16 matrix units on this CPU (Intel AMX tiles or AVX512-BF16; lscpu's
    ``amx_bf16`` / ``avx512_bf16``). Without them bf16 matmuls are emulated, ~100x slower."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@functools.lru_cache(maxsize=16)
def bf16_speedup(rows: int, dim: int, hidden: int, repeats: int = 5) -> float:
    """fp32 time / bf16-autocast time of the matmuls of one MLP layer of the run's shapes
    ((rows, dim) @ (dim, hidden)), forward and backward, measured here (best of ``repeats``)."""
    # its own generator: the measurement must not move the run's random stream (drop-path draws
    # from the global one; a resumed process measures again after restoring it)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g).requires_grad_()
    w = torch.randn(dim, hidden, generator=g).requires_grad_()

    def best(bf16: bool) -> float:
        times = []
        for _ in range(repeats + 1):  # the first call warms the kernels up
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                (x @ w).float().sum().backward()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(False) / best(True)


def auto_precision(device: torch.device | str, rows: int, dim: int, hidden: int) -> tuple[str, str]:
    """(precision, why) of ``auto`` for matmuls of (rows, dim) @ (dim, hidden) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16", "auto on CUDA: bf16 autocast"
    if not cpu_bf16_units():
        return "fp32", "auto on a CPU without bf16 matrix units (AMX / AVX512-BF16): fp32"
    speedup = bf16_speedup(rows, dim, hidden)
    if speedup > MIN_SPEEDUP:
        return "bf16", f"auto on a CPU with bf16 units: bf16 measured {speedup:.2f}x fp32 here"
    return "fp32", f"auto: the CPU has bf16 units but bf16 measured {speedup:.2f}x fp32 here"


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a resolved precision ("fp32": none; "bf16": bf16 autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} here, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")
