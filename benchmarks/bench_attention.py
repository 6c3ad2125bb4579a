"""Attention forward + backward on CPU: timm's (PyTorch's flash kernel) against ``short_attention``.

    python -m benchmarks.bench_attention            # -> benchmarks/results/attention.json

One attention layer (qkv linear, attention, output projection) of the CPU profile's shapes
(128 global crops of 50 tokens and 256 local crops of 10 tokens, 4 heads of 32) and of longer
sequences, forward and backward, the two versions interleaved in one process; medians of
CPU seconds. ``dinoflow.models.vit.SHORT_SEQUENCE_MAX`` (which sequences take the
``short_attention`` path) was set from this table.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import ROOT, interleaved_times, machine_info, median
from dinoflow.models.vit import DinoBlock

# (name, batch, tokens, embed dim, heads)
SHAPES = [
    ("cpu profile, global crops", 128, 50, 128, 4),
    ("cpu profile, local crops", 256, 10, 128, 4),
    ("ViT-S/14, 42 px local crops", 32, 10, 384, 6),
    ("ViT-S/14, 112 px global crops", 16, 65, 384, 6),
    ("ViT-S/14 at 224 px", 16, 257, 384, 6),
]


def bench_shape(batch: int, tokens: int, dim: int, heads: int, repeats: int) -> dict:
    torch.manual_seed(0)
    block = DinoBlock(dim, heads, qkv_bias=True).train()
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    grad = torch.randn(batch, tokens, dim)

    def run(attend):
        def once(_: int) -> None:
            x.grad = None
            block.zero_grad(set_to_none=True)
            attend(x).backward(grad)
        return once

    contenders = {"timm_sdpa": run(block.attn), "short_attention": run(block._attention_short)}
    times = interleaved_times(contenders, repeats=repeats, warmup=2)
    out = {k: median(v["cpu"]) * 1e3 for k, v in times.items()}
    with torch.no_grad():
        err = float((block.attn(x) - block._attention_short(x)).abs().max())
    return {"timm_sdpa_cpu_ms": out["timm_sdpa"], "short_attention_cpu_ms": out["short_attention"],
            "speedup": out["timm_sdpa"] / out["short_attention"], "max_abs_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, b, t, d, h in SHAPES:
        r = {"shape": name, "batch": b, "tokens": t, "dim": d, "heads": h,
             **bench_shape(b, t, d, h, args.repeats)}
        print(f"{name:28s} B {b:4d} T {t:4d}: flash {r['timm_sdpa_cpu_ms']:7.1f} ms, short "
              f"{r['short_attention_cpu_ms']:7.1f} ms CPU fwd+bwd -> {r['speedup']:.2f}x", flush=True)
        rows.append(r)
    result = {"machine": machine_info(args.threads), "threads": args.threads, "rows": rows}
    (ROOT / "benchmarks/results/attention.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
