"""The teacher's kNN top-1 on a fixed labelled subset during training (the starting point too),
and once, on the same subset, raw pixels' (the reference the features have to beat)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from dinoflow import tracking
from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.distributed import broadcast_from_main
from dinoflow.evaluation.knn import backbone_knn, pixels_knn
from dinoflow.models.ssl import SSLModel

log = logging.getLogger(__name__)


class OnlineKNN:
    """``check(teacher, step)`` every ``train.knn_every_epochs``: k = 20, DINOv2 weighting, a train
    bank against val queries (never test). Under FSDP rank 0 evaluates an unsharded copy.
    ``on_knn(step, top1)`` (an Optuna pruner) is called after each check and may raise. The
    first check also measures raw pixels on the same bank and queries (``knn/raw_pixels_top1_k20``,
    logged at that step and kept in that history row)."""

    def __init__(
        self,
        cfg: PretrainConfig,
        bank: Split,
        queries: Split,
        mean: list[float],
        std: list[float],
        steps_per_epoch: int,
        device: torch.device,
        fsdp: bool,
        main: bool,
        build_backbone: Callable[[], torch.nn.Module],
        on_knn: Callable[[int, float], None] | None = None,
    ):
        self.cfg, self.bank, self.queries, self.mean, self.std = cfg, bank, queries, mean, std
        self.every = max(1, int(round(cfg.train.knn_every_epochs * steps_per_epoch)))
        self.device, self.fsdp, self.main = device, fsdp, main
        self.build_backbone, self.on_knn = build_backbone, on_knn
        self.raw_pixels: float | None = None
        self.seconds = 0.0  # the last check's wall time (a time budget reserves it per check)

    def due(self, done: int, last_step: int) -> bool:
        return done % self.every == 0 or done == last_step

    def _top1(self, backbone: torch.nn.Module) -> float:
        # the features in the run's precision (pinned before the loop: "fp32" or "bf16"), as
        # the evaluation pipeline extracts them (evaluation.precision auto)
        return backbone_knn(
            backbone,
            self.bank,
            self.queries,
            self.mean,
            self.std,
            self.cfg.crops.global_size,
            self.device,
            precision=self.cfg.train.precision,
        )["top1_k20"]

    def check(self, teacher: SSLModel, done: int, history: list[dict[str, float]]) -> float:
        started = time.perf_counter()
        if self.fsdp:
            from dinoflow.distributed import gather_full_state

            full = gather_full_state(teacher.backbone)[0]
            top1 = torch.zeros(1, dtype=torch.float64, device=self.device)
            if self.main:
                with torch.random.fork_rng(devices=[]):
                    backbone = self.build_backbone().to(self.device)
                backbone.load_state_dict(full)
                top1 += self._top1(backbone)
            acc = float(broadcast_from_main(top1))
        else:
            acc = self._top1(teacher.backbone)
        self.seconds = time.perf_counter() - started  # the features' check, without raw pixels
        row = {"step": done, "knn/top1_k20": acc}
        if self.raw_pixels is None:
            self.raw_pixels = pixels_knn(self.bank, self.queries, self.cfg.crops.global_size)[
                "top1_k20"
            ]
            row["knn/raw_pixels_top1_k20"] = self.raw_pixels
        history.append(row)
        if self.main:
            tracking.log_metrics({k: v for k, v in row.items() if k != "step"}, step=done)
            log.info(
                "step %d: online kNN top-1 (k=20) %.4f (raw pixels %.4f)",
                done,
                acc,
                self.raw_pixels,
            )
        if self.on_knn is not None:
            self.on_knn(done, acc)
        return acc
