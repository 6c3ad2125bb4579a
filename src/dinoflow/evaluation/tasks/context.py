"""What the evaluation tasks share: the settings every task reads (``SharedSettings``), the
context a task runs in (``EvalContext``), what it returns (``TaskResult``) and how the report
lists it (``EvaluationTask``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, Field, model_validator
from torch import nn

from dinoflow.config import Strict
from dinoflow.data.transforms import DEFAULT_CROP_RATIO
from dinoflow.evaluation.features import ImageSource
from dinoflow.evaluation.tasks.baselines import Baselines

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
S = TypeVar("S", bound=BaseModel)
AtLeastOne = Annotated[int, Field(ge=1)]  # counts and sizes
Positive = Annotated[float, Field(gt=0)]  # rates and temperatures


class SharedSettings(Strict):
    """The knobs every task reads: output folder, preprocessing, the backbone's forward, seed.
    Defaults fit the CPU budget of conf/base (see the README)."""

    out_dir: str | Path = "data/08_reporting"
    image_size: int | None = None  # None: the images' own size (must be a multiple of the patch)
    # every image: shorter side to round(image_size / crop_ratio), centre image_size crop
    # (dinoflow.data.transforms.resize_center_crop; DINOv2's 224 / 256)
    crop_ratio: Annotated[float, Field(gt=0, le=1)] = DEFAULT_CROP_RATIO
    mean: tuple[float, ...] = (0.5,)  # in [0, 1] units, one value or one per channel
    std: tuple[float, ...] = (0.5,)
    batch_size: AtLeastOne = 256  # feature extraction
    n_last_blocks: AtLeastOne = 4
    device: str = "cpu"
    # the frozen backbone's forward: fp32, or bf16 autocast as DINOv2's evaluations run their
    # feature models (features, heads and probes stay float32); auto: train.precision's rule
    # (dinoflow.precision.auto_precision) for the evaluation's shapes
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    progress: bool = True
    seed: int = 0
    n_pictures: Annotated[int, Field(ge=0)] = 8  # examples in each picture (PCA, segmentation)

    @model_validator(mode="after")
    def _check_normalisation(self) -> SharedSettings:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"evaluation.mean and evaluation.std differ in length: {self.mean} vs {self.std}"
            )
        return self


class Timer:
    """``with context.timer(name):`` logs the step and records its seconds in ``timings[name]``."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        log.info("evaluation: %s", self.name)

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.start, 2)


@dataclass
class TaskResult:
    """What a task adds to the report: flat metrics (metrics.json), entries of
    evaluation_details.json, and files ({name: path} of its pictures)."""

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What the tasks share.

    settings: the shared knobs (the resolved precision, never "auto");
    labelled: ``metric_spec.splits_are_labelled(splits)``; class_names: one per label ([] when
    unlabelled); timings: seconds of each timed step (evaluation_details.json ``timings_s``);
    results: the results of the tasks run so far, by task name.
    """

    backbone: nn.Module
    splits: Mapping[str, ImageSource]
    settings: SharedSettings
    baselines: Baselines
    labelled: bool
    class_names: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, TaskResult] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.settings.out_dir)

    def timer(self, name: str) -> Timer:
        return Timer(self.timings, name)


@dataclass(frozen=True)
class EvaluationTask:
    """One entry of ``report.TASKS``: its name, its settings model (whose flat keys are
    ``evaluation.*`` parameters) and ``run(context, settings) -> TaskResult``."""

    name: str
    settings: type[Strict]
    run: Callable[[EvalContext, Any], TaskResult]

    def settings_from(self, values: BaseModel) -> Strict:
        """The task's settings from the keys of ``values`` (``report.EvalSettings``) it has."""
        return settings_part(self.settings, values)


def settings_part(model: type[S], values: BaseModel) -> S:
    """A ``model`` from the keys of ``values`` it has (its defaults for the others), validated."""
    given = values.model_dump()
    return model.model_validate({k: given[k] for k in model.model_fields if k in given})


def class_names(splits: Mapping[str, ImageSource]) -> list[str]:
    """The train split's class names, completed with the label number up to the largest label."""
    names = list(getattr(splits["train"], "class_names", None) or [])
    top = max(int(np.max(np.asarray(s.labels), initial=-1)) for s in splits.values()) + 1
    if len(names) < top:
        names = names + [str(i) for i in range(len(names), top)]
    return names
