"""Benchmark (not a test): evaluation speed of the CPU-profile backbone.

    python -m benchmarks.bench_eval --threads 2

- feature extraction: ``dinoflow.evaluation.features.extract_features`` (the frozen teacher
  backbone over uint8 28 x 28 images, batch 256, CLS of the last 4 blocks + patch means), images/s
  in the precision ``evaluation.precision: auto`` picks here, and its ratio to fp32 (interleaved);
- kNN: ``dinoflow.evaluation.knn.knn_classify`` of 10,000 queries against a 60,000-image bank
  (Fashion-MNIST's sizes; random features of the backbone's width, 10 classes, k = 10/20/100/200),
  seconds and queries/s;
- peak resident memory above the starting point during each.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.bench_step import profile_config
from benchmarks.common import PeakRSS, machine_info
from dinoflow.data import Split
from dinoflow.evaluation.features import extract_features
from dinoflow.evaluation.knn import knn_classify
from dinoflow.evaluation.report import EvalSettings, evaluation_precision
from dinoflow.training import backbone_from_config


def bench_features(n_images: int = 4096, rounds: int = 2) -> dict[str, float]:
    """extract_features over n_images synthetic uint8 images at the CPU profile's crop size, in
    fp32 and in the evaluation's auto precision, alternating (best of ``rounds`` each)."""
    cfg, channels = profile_config("cpu")
    torch.manual_seed(0)
    backbone = backbone_from_config(cfg.backbone, cfg.crops.global_size, channels).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, 28, 28), dtype=np.uint8)
    split = Split(ids=[str(i) for i in range(n_images)], labels=np.zeros(n_images, np.int64),
                  class_names=["x"], channels=1, images=images)
    size, mean, std = cfg.crops.global_size, [0.5], [0.25]
    precision, why = evaluation_precision(EvalSettings(image_size=size, batch_size=256), backbone)
    times: dict[str, list[tuple[float, float]]] = {"fp32": [], precision: []}
    with PeakRSS() as mem:
        for _ in range(rounds):
            for p in times:
                extract_features(backbone, split.subset(np.arange(256)), size, mean, std,
                                 progress=False, precision=p)  # warm-up
                c0, t0 = time.process_time(), time.perf_counter()
                feats = extract_features(backbone, split, size, mean, std, batch_size=256,
                                         progress=False, precision=p)
                times[p].append((time.perf_counter() - t0, time.process_time() - c0))
    assert feats.cls_last.shape == (n_images, backbone.embed_dim)
    wall, cpu = min(times[precision])
    return {"images": n_images, "image_size": cfg.crops.global_size, "precision": precision,
            "precision_reason": why, "wall_s": wall, "cpu_s": cpu, "images_per_s": n_images / wall,
            "fp32_images_per_s": n_images / min(times["fp32"])[0],
            "speedup_vs_fp32": min(times["fp32"])[0] / wall, "peak_rss_extra_mb": mem.extra / 2**20}


def bench_knn(n_bank: int = 60_000, n_queries: int = 10_000, dim: int | None = None) -> dict:
    """knn_classify of n_queries against n_bank random labelled features."""
    cfg, channels = profile_config("cpu")
    dim = dim or backbone_from_config(cfg.backbone, cfg.crops.global_size, channels).embed_dim
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(n_bank, dim, generator=g), torch.randn(n_queries, dim, generator=g)
    bank_labels = torch.randint(0, 10, (n_bank,), generator=g)
    query_labels = torch.randint(0, 10, (n_queries,), generator=g)
    with PeakRSS() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        acc = knn_classify(bank, bank_labels, queries, query_labels, 10)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert 0.0 <= acc["top1_k20"] <= 1.0
    return {"bank": n_bank, "queries": n_queries, "dim": dim, "ks": [10, 20, 100, 200],
            "wall_s": wall, "cpu_s": cpu, "queries_per_s": n_queries / wall,
            "peak_rss_extra_mb": mem.extra / 2**20}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=4096)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine_info(args.threads), "features": bench_features(args.images),
              "knn": bench_knn()}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
