"""The baselines every task measures beside the backbone, so each report shows what pretraining
added: the same architecture at random initialisation (``random``: every task) and raw pixels
(``pixels``: classification). Their settings, the random-init twin and the train subsets."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import model_validator
from torch import nn

from dinoflow.config import Strict
from dinoflow.evaluation.features import ImageSource

BASELINES = ("random", "pixels")


class BaselineSettings(Strict):
    """``evaluation.baselines`` and the train caps of the classification baselines."""

    baselines: tuple[str, ...] = BASELINES
    baseline_max_train: int | None = None  # subsample train for the baselines, to bound time
    # the random-init baseline alone (its features cost a forward pass per image; pixels' do not)
    baseline_random_max_train: int | None = None

    @model_validator(mode="after")
    def _check_baselines(self) -> BaselineSettings:
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(
                f"evaluation.baselines: unknown {sorted(unknown)} (choose from {BASELINES})"
            )
        return self


class Subset:
    """Rows ``indices`` of an image source, with the same protocol (len, load, labels, images)."""

    def __init__(self, source: ImageSource, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices
        self.labels = np.asarray(source.labels)[indices]
        images = getattr(source, "images", None)
        self.images = images[indices] if isinstance(images, np.ndarray) else None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> torch.Tensor:
        return self.source.load(int(self.indices[i]))


def random_init_like(
    backbone: nn.Module, seed: int = 0, factory: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """The same architecture at random initialisation.

    ``factory()`` when given; else ``type(backbone)(**backbone.backbone_kwargs())`` (dinoflow's
    DinoVisionTransformer); else a deep copy whose submodules are ``reset_parameters()``-ed
    (parameters held directly by a module without that method keep their values).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if factory is not None:
            return factory()
        if hasattr(backbone, "backbone_kwargs"):
            return type(backbone)(**backbone.backbone_kwargs())
        model = copy.deepcopy(backbone)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return model


def subsample_train(
    splits: Mapping[str, ImageSource], seed: int, *caps: int | None
) -> dict[str, ImageSource]:
    """The splits with train subsampled (fixed seed) to the smallest of ``caps`` that is set."""
    out = dict(splits)
    n_train = len(splits["train"])
    cap = min((c for c in caps if c is not None), default=None)
    if cap is not None and n_train > cap:
        order = np.random.default_rng(seed).permutation(n_train)
        out["train"] = Subset(splits["train"], np.sort(order[:cap]))
    return out


@dataclass(frozen=True)
class Baselines:
    """What the tasks measure beside the backbone.

    random: the random-init twin (None: ``random`` not in ``evaluation.baselines``);
    pixels: raw pixels as features; splits: train capped at ``baseline_max_train``;
    random_splits: also at ``baseline_random_max_train`` (the random-init classification).
    """

    random: nn.Module | None
    pixels: bool
    splits: Mapping[str, ImageSource]
    random_splits: Mapping[str, ImageSource]

    def details(self) -> dict[str, int]:
        """The train sizes of the classification baselines (evaluation_details.json)."""
        return {
            "baseline_train_size": len(self.splits["train"]),
            "baseline_random_train_size": len(self.random_splits["train"]),
        }


def prepare_baselines(
    backbone: nn.Module,
    splits: Mapping[str, ImageSource],
    settings: BaselineSettings,
    seed: int,
    factory: Callable[[], nn.Module] | None = None,
) -> Baselines:
    """The random-init twin (``random_init_like(backbone, seed, factory)``) and the train subsets."""
    random = random_init_like(backbone, seed, factory) if "random" in settings.baselines else None
    caps = (settings.baseline_max_train, settings.baseline_random_max_train)
    return Baselines(
        random=random,
        pixels="pixels" in settings.baselines,
        splits=subsample_train(splits, seed, caps[0]),
        random_splits=subsample_train(splits, seed, *caps),
    )
