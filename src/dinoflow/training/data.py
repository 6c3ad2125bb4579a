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

from dinoflow.augment import MultiCropAugmentation, collate_multicrop
from dinoflow.config import CropsConfig, PretrainConfig
from dinoflow.data import Split
from dinoflow.masking import BlockMaskGenerator, sample_masks


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
    """Items are (step, data_epoch, index); crops are a pure function of (seed, epoch, index).

    Seeding per sample makes the views independent of workers, ranks and resumption.
    """

    def __init__(self, split: Split, augmentation: MultiCropAugmentation, seed: int):
        self.split, self.augmentation, self.seed = split, augmentation, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        step, epoch, index = item
        # a generator of its own: the global RNG stays untouched, and torch.manual_seed would
        # also queue a CUDA seeding with a formatted stack trace (14% of the loader's time)
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        crops = self.augmentation(self.split.load(index), generator=rng)
        crops["step"] = step
        return crops


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


class MaskingCollate:
    """Stacks crops and adds iBOT masks drawn for the global batch from (seed, step).

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

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        step = samples[0]["step"]
        batch = collate_multicrop(samples)
        b, g = batch["batch_size"], batch["batch_size"] * self.world_size
        masks = self.masks(step, g)
        # global position of local image j on this rank is rank + world * j (DistributedSampler)
        mine = self.rank + self.world_size * torch.arange(b)
        batch["masks"] = torch.cat([masks[mine], masks[g + mine]])
        batch["step"] = step
        return batch


def build_loader(cfg: PretrainConfig, train: Split, mean: list[float], std: list[float],
                 rank: int, world_size: int, start_step: int, last_step: int,
                 device: torch.device) -> DataLoader:
    """Batches for steps [start_step, last_step) of this rank, collated with their masks."""
    t = cfg.train
    sampler = StepBatchSampler(len(train), t.batch_size, rank, world_size, t.seed, start_step,
                               last_step)
    dataset = MultiCropDataset(train, build_augmentation(cfg.crops, mean, std), t.seed)
    workers = t.num_workers
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=MaskingCollate(cfg, rank, world_size),
                      num_workers=workers, pin_memory=t.pin_memory and device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if workers else None,
                      # its own generator: the loader must not draw from the global RNG (drop
                      # path), or a resumed run would diverge from an uninterrupted one
                      generator=torch.Generator().manual_seed(t.seed))
