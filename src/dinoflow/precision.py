"""bf16 autocast or fp32: a rule of the hardware and the shapes, never a timing.

Training (``train.precision``) and evaluation (``evaluation.precision``) choose with the same
rule, so the same commit, parameters and machine always train and evaluate in the same precision:

- CUDA: bf16 autocast.
- A CPU without native bf16 matrix units (AMX or AVX512-BF16): fp32 (bf16 would be emulated).
- A CPU with them: bf16 when one MLP layer of the run's shapes, (rows, dim) @ (dim, hidden), is
  at least ``MIN_BF16_MACS`` multiply-accumulates; below that the casts cost about what the
  matmuls save. Measured on AMD EPYC Zen 4 (avx512_bf16), 2 threads, forward + backward, bf16 /
  fp32 speed: 0.5x at 0.5M, 1.0-1.3x at 5M, 1.2x at 8M, 1.35-1.4x at 16.8M, 1.6-1.9x at 30M,
  2.1-2.5x at 105M (conf/base's step) and above. Intel AMX measured 1.9-2.8x on conf/base.

Weights stay fp32 either way (autocast casts per op). The choice and its reason are logged.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")
MIN_BF16_MACS = 2**24  # one MLP layer's multiply-accumulates from which bf16 is clearly faster


def cpu_bf16_units() -> bool:
    """Native bf16 matrix units on this CPU (Intel AMX tiles or AVX512-BF16; lscpu's
    ``amx_bf16`` / ``avx512_bf16``) that PyTorch's kernels may use: ``ATEN_CPU_CAPABILITY=avx2``
    limits them to AVX2, where bf16 matmuls are emulated, ~100x slower."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def auto_precision(device: torch.device | str, rows: int, dim: int, hidden: int) -> tuple[str, str]:
    """(precision, why) of ``auto`` for matmuls of (rows, dim) @ (dim, hidden) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16", "auto on CUDA: bf16 autocast"
    if not cpu_bf16_units():
        return "fp32", "auto on a CPU without bf16 matrix units (AMX / AVX512-BF16): fp32"
    macs = rows * dim * hidden
    shape = f"one MLP layer {rows}x{dim} @ {dim}x{hidden} = {macs / 1e6:.1f}M MACs"
    if macs >= MIN_BF16_MACS:
        return (
            "bf16",
            f"auto on a CPU with bf16 units: bf16 ({shape} >= {MIN_BF16_MACS / 1e6:.1f}M)",
        )
    return "fp32", f"auto on a CPU with bf16 units: fp32 ({shape} < {MIN_BF16_MACS / 1e6:.1f}M)"


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a resolved precision ("fp32": none; "bf16": bf16 autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} here, got {precision!r}")
    return torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"
    )
