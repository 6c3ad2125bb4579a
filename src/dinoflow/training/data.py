"""The training data path: per-image multi-crop views, per-step batches, iBOT masks.

Crops are a pure function of (seed, data epoch, image index) and masks of (seed, step), so the
data need no state in a checkpoint, and 1 process or N processes see the same views and masks
for the same image. A file that became unreadable after the split was made is replaced by
another image of the split, chosen from (seed, epoch, index) alone; ``UnreadableFiles`` counts
them (the only data state a checkpoint keeps) and stops the run past a limit.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dinoflow import tracking
from dinoflow.augment import MultiCropAugmentation
from dinoflow.config import CropsConfig, PretrainConfig
from dinoflow.data import Split
from dinoflow.distributed import all_gather_objects
from dinoflow.errors import DataError
from dinoflow.masking import BlockMaskGenerator, masked_count_bounds, sample_masks

log = logging.getLogger(__name__)

# replacements tried for one unreadable file: more failing in a row is not a changed file but a
# folder gone (unmounted, moved), which a replacement would only hide
REPLACEMENT_TRIES = 64


def build_augmentation(
    crops: CropsConfig, mean: list[float], std: list[float]
) -> MultiCropAugmentation:
    """``pretrain.crops`` -> the multi-crop augmentation, normalised with the data's mean/std."""
    c = crops
    return MultiCropAugmentation(
        global_size=c.global_size,
        local_size=c.local_size,
        n_local=c.n_local,
        global_scale=c.global_scale,
        local_scale=c.local_scale,
        flip_p=c.flip_p,
        jitter=c.jitter,
        jitter_p=c.jitter_p,
        grayscale_p=c.grayscale_p,
        blur_kernel=c.blur_kernel,
        blur_sigma=c.blur_sigma,
        blur_p=c.blur_p,
        solarize_threshold=c.solarize_threshold,
        solarize_p=c.solarize_p,
        mean=tuple(mean),
        std=tuple(std),
        reference_blur_bug=c.reference_blur_bug,
    )


def replacement_order(n: int, seed: int, epoch: int, index: int) -> Iterator[int]:
    """The images that stand in for an unreadable image ``index`` of ``n``, in the order tried:
    the others from a start drawn from (seed, epoch, index), at most ``REPLACEMENT_TRIES``. A
    function of its arguments only: the same in every worker, process and resumed run."""
    if n < 2:
        return
    start = int(np.random.default_rng([seed, epoch, index, 11]).integers(n - 1))
    for k in range(min(n - 1, REPLACEMENT_TRIES)):
        yield (index + 1 + (start + k) % (n - 1)) % n


class MultiCropDataset(Dataset):
    """Items are (step, data_epoch, index) -> the image, the generator of its crops and the ids
    of the files found unreadable on the way.

    The generator is seeded from (seed, epoch, index), so the views are independent of workers,
    ranks, batches and resumption; ``MultiCropCollate`` augments the batch's images together.
    An image that cannot be read is replaced by the first readable one of ``replacement_order``,
    cropped with the same (seed, epoch, index) generator: the views the lost image would have had.
    """

    def __init__(self, split: Split, seed: int):
        self.split, self.seed = split, seed
        self.warned: set[int] = set()  # one warning per file and process

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        step, epoch, index = item
        # a generator of its own: the global RNG stays untouched, and torch.manual_seed would
        # also queue a CUDA seeding with a formatted stack trace (14% of the loader's time)
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        image, unreadable = self.load(epoch, index)
        return {"image": image, "generator": rng, "step": step, "unreadable": unreadable}

    def load(self, epoch: int, index: int) -> tuple[torch.Tensor, list[str]]:
        """Image ``index``, or its replacement when the file cannot be read any more (deleted,
        truncated, overwritten since the split was made) -> (image, ids found unreadable)."""
        unreadable: list[str] = []
        tried = replacement_order(len(self.split), self.seed, epoch, index)
        for i in itertools.chain([index], tried):
            try:
                return self.split.load(i), unreadable
            except DataError as exc:
                unreadable.append(self.split.ids[i])
                if i not in self.warned:
                    self.warned.add(i)
                    log.warning("%s: skipped, another image of the split takes its place", exc)
        raise DataError(
            f"cannot read {self.split.ids[index]} nor the {len(unreadable) - 1} images tried in "
            f"its place ({', '.join(unreadable[1:6])}, ...): is data.path still there?"
        )


class StepBatchSampler:
    """Per-rank batches for steps [start_step, total_steps) through DistributedSampler.

    Data epoch e is DistributedSampler's epoch-seeded permutation; batch b of rank r is its
    rank-slice [b*B, (b+1)*B): across ranks that is exactly the single-process global batch b.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
    ):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.batches_per_epoch = n // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{n} training images are fewer than one global batch "
                f"({batch_size} x {world_size} processes): lower pretrain.train.batch_size"
            )

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self):
        sampler = DistributedSampler(
            range(self.n),
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        epoch = -1
        order: list[int] = []
        for step in range(self.start_step, self.total_steps):
            e, b = divmod(step, self.batches_per_epoch)
            if e != epoch:
                epoch = e
                sampler.set_epoch(e)
                order = list(sampler)
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(step, e, i) for i in rows]


class StepMasks:
    """The iBOT masks of a step, drawn for the global batch from (seed, step).

    Masks are drawn for all 2 * B * world crops and each rank keeps the rows of its images, so
    1 process and N processes see the same masks for the same image.
    """

    def __init__(self, cfg: PretrainConfig, rank: int, world_size: int):
        grid = cfg.crops.global_size // cfg.backbone.patch_size
        m = cfg.masking
        self.generator = BlockMaskGenerator(
            (grid, grid),
            max_mask_ratio=m.max_mask_ratio,
            min_num_patches=m.min_num_patches,
            min_aspect=m.min_aspect,
            max_attempts=m.max_attempts,
            reject_small_blocks=m.reject_small_blocks,
        )
        self.grid, self.m, self.seed = (grid, grid), m, cfg.train.seed
        self.rank, self.world_size = rank, world_size

    def masks(self, step: int, global_batch: int) -> torch.Tensor:
        """(2 * global_batch, H*W) bool: the masks of every global crop of the step."""
        rng = np.random.default_rng([self.seed, step, 7])
        return sample_masks(
            2 * global_batch,
            self.grid,
            self.generator,
            rng,
            self.m.mask_probability,
            (self.m.ratio_min, self.m.ratio_max),
        )

    def max_masked(self, batch_size: int) -> int:
        """The most masked patches this rank's 2 * batch_size global crops can hold: the
        largest bounds of ``masked_count_bounds``, one per crop (all of them on one process).
        The networks pad the masked tokens to it, so their shapes stay the same every step."""
        g = batch_size * self.world_size
        bounds = masked_count_bounds(
            2 * g,
            self.grid[0] * self.grid[1],
            self.m.mask_probability,
            (self.m.ratio_min, self.m.ratio_max),
        )  # cached
        return sum(bounds[: 2 * batch_size])

    def for_rank(self, step: int, batch_size: int) -> torch.Tensor:
        """(2 * batch_size, H*W) bool: this rank's rows, ordered as its global crops."""
        g = batch_size * self.world_size
        masks = self.masks(step, g)
        # global position of local image j on this rank is rank + world * j (DistributedSampler)
        mine = self.rank + self.world_size * torch.arange(batch_size)
        return torch.cat([masks[mine], masks[g + mine]])


class MultiCropCollate:
    """MultiCropDataset samples -> the step's batch: the images' multi-crop views, augmented
    together (``MultiCropAugmentation.views``), and their iBOT masks."""

    def __init__(self, augmentation: MultiCropAugmentation, masks: StepMasks):
        self.augmentation, self.step_masks = augmentation, masks

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        step = samples[0]["step"]
        batch = self.augmentation.views(
            [s["image"] for s in samples], [s["generator"] for s in samples]
        )
        batch["masks"] = self.step_masks.for_rank(step, batch["batch_size"])
        batch["max_masked"] = self.step_masks.max_masked(batch["batch_size"])
        batch["step"] = step
        batch["unreadable"] = [name for s in samples for name in s["unreadable"]]
        return batch


class UnreadableFiles:
    """The train files found unreadable during a run, over every loader worker (each batch
    carries its own) and every process (``sync``: a collective, called at the same steps on each).

    Their count is the MLflow metric ``data/unreadable_files``, their ids the artifact
    ``unreadable_files.txt``; past ``max_fraction`` of the split the run stops with one
    ``DataError``. ``known``: the ids a resumed checkpoint had found.
    """

    def __init__(
        self,
        known: list[str],
        n_images: int,
        max_fraction: float,
        every: int,
        key: str = "pretrain.train.max_unreadable_fraction",
    ):
        self.names, self.n_images, self.every = set(known), n_images, every
        self.max_fraction, self.key = max_fraction, key
        self.logged: int | None = None

    def add(self, batch: dict[str, Any]) -> None:
        self.names.update(batch["unreadable"])

    def due(self, done: int) -> bool:
        return done % self.every == 0

    def sync(self, step: int) -> list[str]:
        """The ids found so far by any process, sorted; logged when their count changed; a
        ``DataError`` naming them past the limit."""
        for names in all_gather_objects(sorted(self.names)):
            self.names.update(names)
        found = sorted(self.names)
        if len(found) != self.logged:
            tracking.log_metrics({"data/unreadable_files": len(found)}, step=step)
            self.logged = len(found)
        if len(found) > self.max_fraction * self.n_images:
            self.log_names()
            more = f" and {len(found) - 20} more" if len(found) > 20 else ""
            raise DataError(
                f"{len(found)} of the {self.n_images} training images are unreadable, more than "
                f"{self.key}={self.max_fraction} of them: {', '.join(found[:20])}{more}. Replace "
                "or remove them (and re-run curation), or raise the limit to go on from the "
                "last checkpoint"
            )
        return found

    def log_names(self) -> None:
        if self.names:
            tracking.log_text("\n".join(sorted(self.names)), "unreadable_files.txt")


def build_loader(
    cfg: PretrainConfig,
    train: Split,
    mean: list[float],
    std: list[float],
    rank: int,
    world_size: int,
    start_step: int,
    last_step: int,
    device: torch.device,
) -> DataLoader:
    """Batches for steps [start_step, last_step) of this rank, collated with their masks."""
    t = cfg.train
    sampler = StepBatchSampler(
        len(train), t.batch_size, rank, world_size, t.seed, start_step, last_step
    )
    collate = MultiCropCollate(
        build_augmentation(cfg.crops, mean, std), StepMasks(cfg, rank, world_size)
    )
    workers = t.num_workers
    return DataLoader(
        MultiCropDataset(train, t.seed),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=t.pin_memory and device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        # its own generator: the loader must not draw from the global RNG (drop
        # path), or a resumed run would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(t.seed),
    )


# Loader processes for image files on a CPU: at least this many. benchmarks/bench_loader.py (AMD
# EPYC, 2 cores, the ViT-S/14 profile's step fed by its loader): 4.3 / 5.3 / 7.8 images/s with
# 0 / 1 / 2 workers on 2-5K photos, 6.9 / 6.9 / 7.1 from the image cache (workers that wait cost
# the step nothing). Decoding and augmenting the photos took ~40 % of the loop's CPU, so larger
# machines get a third of their cores.
CPU_FILE_WORKERS = 2


def resolve_num_workers(cfg: PretrainConfig, train: Split, device: torch.device) -> PretrainConfig:
    """``train.num_workers: auto`` -> loader processes for this process's share of the cores.

    CUDA: the cores per local process, one left for the training process itself (the GPU does
    the compute; the loader is the CPU's work). CPU: the loader's processes take cores from
    the training threads, so none for in-memory images (Fashion-MNIST: the augmentation alone,
    ~0.02 s per batch, measured faster in the training process, docs/dev/performance.md) nor
    with ``train.compile`` (compiled kernels crashed once a worker had been forked, parallel.py);
    for image files a third of the cores, at least ``CPU_FILE_WORKERS`` (none on one core).
    """
    if cfg.train.num_workers != "auto":
        return cfg
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda":
        workers = max(0, cores - 1)
    elif train.images is not None or cfg.train.compile:
        workers = 0
    else:
        workers = 0 if cores < 2 else max(CPU_FILE_WORKERS, cores // 3)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers})})
