"""The training data path: per-image multi-crop views, per-step batches, iBOT masks.

Crops are a pure function of (seed, data epoch, image index) and masks of (seed, step), so the
data need no state in a checkpoint, and 1 process or N processes see the same views and masks
for the same image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dinoflow.augment import MultiCropAugmentation
from dinoflow.config import CropsConfig, PretrainConfig
from dinoflow.data import Split
from dinoflow.masking import BlockMaskGenerator, masked_count_bounds, sample_masks


def build_augmentation(crops: CropsConfig, mean: list[float], std: list[float]) -> MultiCropAugmentation:
    """``pretrain.crops`` -> the multi-crop augmentation, normalised with the data's mean/std."""
    c = crops
    return MultiCropAugmentation(
        global_size=c.global_size, local_size=c.local_size, n_local=c.n_local,
        global_scale=c.global_scale, local_scale=c.local_scale, flip_p=c.flip_p, jitter=c.jitter,
        jitter_p=c.jitter_p, grayscale_p=c.grayscale_p, blur_kernel=c.blur_kernel,
        blur_sigma=c.blur_sigma, blur_p=c.blur_p, solarize_threshold=c.solarize_threshold,
        solarize_p=c.solarize_p, mean=tuple(mean), std=tuple(std),
        reference_blur_bug=c.reference_blur_bug,
    )  # fmt: skip


class MultiCropDataset(Dataset):
    """Items are (step, data_epoch, index) -> the image and the generator of its crops.

    The generator is seeded from (seed, epoch, index), so the views are independent of workers,
    ranks, batches and resumption; ``MultiCropCollate`` augments the batch's images together.
    """

    def __init__(self, split: Split, seed: int):
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        step, epoch, index = item
        # a generator of its own: the global RNG stays untouched, and torch.manual_seed would
        # also queue a CUDA seeding with a formatted stack trace (14% of the loader's time)
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        return {"image": self.split.load(index), "generator": rng, "step": step}


class StepBatchSampler:
    """Per-rank batches for steps [start_step, total_steps) through DistributedSampler.

    Data epoch e is DistributedSampler's epoch-seeded permutation; batch b of rank r is its
    rank-slice [b*B, (b+1)*B): across ranks that is exactly the single-process global batch b.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int, total_steps: int):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.batches_per_epoch = n // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"{n} training images are fewer than one global batch "
                             f"({batch_size} x {world_size} processes): lower pretrain.train.batch_size")

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self):
        sampler = DistributedSampler(range(self.n), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
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
        self.generator = BlockMaskGenerator((grid, grid), max_mask_ratio=m.max_mask_ratio,
                                            min_num_patches=m.min_num_patches,
                                            min_aspect=m.min_aspect, max_attempts=m.max_attempts,
                                            reject_small_blocks=m.reject_small_blocks)
        self.grid, self.m, self.seed = (grid, grid), m, cfg.train.seed
        self.rank, self.world_size = rank, world_size

    def masks(self, step: int, global_batch: int) -> torch.Tensor:
        """(2 * global_batch, H*W) bool: the masks of every global crop of the step."""
        rng = np.random.default_rng([self.seed, step, 7])
        return sample_masks(2 * global_batch, self.grid, self.generator, rng,
                            self.m.mask_probability, (self.m.ratio_min, self.m.ratio_max))

    def max_masked(self, batch_size: int) -> int:
        """The most masked patches this rank's 2 * batch_size global crops can hold: the
        largest bounds of ``masked_count_bounds``, one per crop (all of them on one process).
        The networks pad the masked tokens to it, so their shapes stay the same every step."""
        g = batch_size * self.world_size
        bounds = masked_count_bounds(2 * g, self.grid[0] * self.grid[1], self.m.mask_probability,
                                     (self.m.ratio_min, self.m.ratio_max))  # cached
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
        batch = self.augmentation.views([s["image"] for s in samples],
                                        [s["generator"] for s in samples])
        batch["masks"] = self.step_masks.for_rank(step, batch["batch_size"])
        batch["max_masked"] = self.step_masks.max_masked(batch["batch_size"])
        batch["step"] = step
        return batch


def build_loader(cfg: PretrainConfig, train: Split, mean: list[float], std: list[float],
                 rank: int, world_size: int, start_step: int, last_step: int,
                 device: torch.device) -> DataLoader:
    """Batches for steps [start_step, last_step) of this rank, collated with their masks."""
    t = cfg.train
    sampler = StepBatchSampler(len(train), t.batch_size, rank, world_size, t.seed, start_step,
                               last_step)
    collate = MultiCropCollate(build_augmentation(cfg.crops, mean, std),
                               StepMasks(cfg, rank, world_size))
    workers = t.num_workers
    return DataLoader(MultiCropDataset(train, t.seed), batch_sampler=sampler, collate_fn=collate,
                      num_workers=workers, pin_memory=t.pin_memory and device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if workers else None,
                      # its own generator: the loader must not draw from the global RNG (drop
                      # path), or a resumed run would diverge from an uninterrupted one
                      generator=torch.Generator().manual_seed(t.seed))
