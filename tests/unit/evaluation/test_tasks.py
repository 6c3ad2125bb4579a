"""The evaluation as tasks: the report's task list drives the metrics, each task's settings
validate on their own, and the composed EvalSettings keeps every conf key."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from dinoflow.config import Strict
from dinoflow.evaluation.metric_spec import base_name
from dinoflow.evaluation.report import TASKS, EvalSettings, evaluate_backbone
from dinoflow.evaluation.tasks.baselines import BaselineSettings
from dinoflow.evaluation.tasks.classification import ClassificationSettings
from dinoflow.evaluation.tasks.context import (
    EvalContext,
    EvaluationTask,
    SharedSettings,
    TaskResult,
)
from dinoflow.evaluation.tasks.label_free import LabelFreeSettings
from dinoflow.evaluation.tasks.pictures import PictureSettings
from dinoflow.evaluation.tasks.segmentation import SegmentationSettings

ROOT = Path(__file__).resolve().parents[3]
LABEL_FREE = ["rankme", "alignment", "uniformity", "view_retrieval_top1"]


class Split:
    """Grayscale 8x8 images whose class sets which quadrant is bright; in memory like Fashion-MNIST."""

    class_names = ["tl", "tr", "bl", "br"]

    def __init__(self, n: int, seed: int, labelled: bool = True) -> None:
        rng = np.random.default_rng(seed)
        classes = (np.arange(n) % 4).astype(np.int64)
        self.images = rng.integers(0, 40, (n, 8, 8)).astype(np.uint8)
        for i, c in enumerate(classes):
            r, q = divmod(int(c), 2)
            self.images[i, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 200
        self.labels = classes if labelled else np.full(n, -1, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).unsqueeze(0)


def splits(labelled: bool = True) -> dict[str, Split]:
    return {
        "train": Split(64, 0, labelled),
        "val": Split(16, 1, labelled),
        "test": Split(16, 2, labelled),
    }


def settings(out_dir: Path) -> EvalSettings:
    return EvalSettings(
        out_dir=out_dir,
        mean=(0.3,),
        std=(0.3,),
        batch_size=32,
        precision="fp32",
        progress=False,
        linear_lrs=(0.01, 0.1),
        linear_epochs=2,
        linear_batch_size=16,
        seg_train_scenes=16,
        seg_test_scenes=8,
        seg_canvas=16,
        seg_epochs=1,
        seg_batch_size=8,
        n_pictures=2,
        baseline_random_max_train=32,
    )


@pytest.fixture(scope="module")
def evaluate(tiny_backbone):
    """The factory ``evaluate(out_dir, tasks=TASKS, labelled=True) -> (metrics, files, details)``:
    the report of a TinyBackbone on the tiny splits."""

    def evaluate(out_dir: Path, tasks=TASKS, labelled: bool = True):
        torch.manual_seed(0)
        metrics, files = evaluate_backbone(
            tiny_backbone(), splits(labelled), settings(out_dir), None, tasks
        )
        return metrics, files, json.loads(files["details"].read_text())

    return evaluate


@pytest.fixture(scope="module")
def every_task(tmp_path_factory, evaluate):
    return evaluate(tmp_path_factory.mktemp("all"))


def own_keys(task: str, metrics: dict[str, float]) -> set[str]:
    """The metric keys each task writes, its baselines' (``baseline_*_`` prefixes) included."""
    belongs = {
        "label_free": lambda name: name in LABEL_FREE,
        "classification": lambda name: name.startswith(("knn_", "linear_")),
        "segmentation": lambda name: name.startswith("seg_"),
        "pictures": lambda name: False,
    }[task]
    return {k for k in metrics if belongs(base_name(k))}


def test_the_task_list_is_the_report(every_task) -> None:
    assert [t.name for t in TASKS] == ["label_free", "classification", "segmentation", "pictures"]
    metrics, files, details = every_task
    covered = set().union(*(own_keys(t.name, metrics) for t in TASKS))
    assert covered == set(metrics)  # every metric belongs to one task
    assert {"knn_top1_k200", "baseline_pixels_linear_top1", "seg_iou_background"} <= set(metrics)
    pictures = {"confusion_matrix", "segmentation", "pca_features", "pca_scenes"}
    assert set(files) == pictures | {"pca_features_random", "details"}
    assert details["metrics"] == metrics and details["baseline_random_train_size"] == 32


@pytest.mark.parametrize("task", [t.name for t in TASKS])
def test_disabling_a_task_removes_exactly_its_keys(task, every_task, tmp_path, evaluate) -> None:
    metrics, files, details = every_task
    kept = [t for t in TASKS if t.name != task]
    fewer, fewer_files, fewer_details = evaluate(tmp_path, kept)
    assert set(metrics) - set(fewer) == own_keys(task, metrics)
    assert own_keys(task, metrics) or task == "pictures"
    # the other tasks' numbers do not depend on it
    assert fewer == {k: v for k, v in metrics.items() if k in fewer}
    lost_files = {
        "label_free": set(),
        "classification": {"confusion_matrix"},
        "segmentation": {"segmentation", "pca_scenes"},  # pictures draws the task's scenes
        "pictures": {"pca_features", "pca_scenes", "pca_features_random"},
    }[task]
    assert set(files) - set(fewer_files) == lost_files
    lost_details = {
        "label_free": {"label_free"},
        "classification": {"linear", "baseline_random_linear", "baseline_pixels_linear"},
        "segmentation": {"seg_per_class_iou"},
        "pictures": set(),
    }[task]
    assert set(details) - set(fewer_details) == lost_details
    assert set(fewer_details["timings_s"]) <= set(details["timings_s"])


def test_without_labels_only_the_label_free_metrics(tmp_path, evaluate) -> None:
    metrics, files, details = evaluate(tmp_path, labelled=False)
    assert set(metrics) == set(LABEL_FREE) | {f"baseline_random_{k}" for k in LABEL_FREE}
    assert set(files) == {"pca_features", "pca_features_random", "details"}
    assert details["labelled"] is False


def test_a_new_task_adds_its_metrics_with_its_own_settings(tmp_path, evaluate) -> None:
    class CountSettings(Strict):
        count_fraction: float = 0.25

    @dataclass
    class Seen:
        settings: Strict | None = None

    seen = Seen()

    def run(context: EvalContext, settings: CountSettings) -> TaskResult:
        seen.settings = settings
        n = len(context.splits["test"])
        return TaskResult(metrics={"count_top1": settings.count_fraction}, details={"count": n})

    metrics, _, details = evaluate(tmp_path, (EvaluationTask("count", CountSettings, run),))
    assert metrics == {"count_top1": 0.25} and details["count"] == 16
    assert type(seen.settings) is CountSettings  # its own model, not EvalSettings


def test_each_task_gets_its_own_settings_from_eval_settings(tmp_path) -> None:
    cfg = settings(tmp_path)
    for task in TASKS:
        own = task.settings_from(cfg)
        assert type(own) is task.settings
        assert own.model_dump() == {k: getattr(cfg, k) for k in task.settings.model_fields}


def test_eval_settings_are_the_tasks_settings_composed() -> None:
    parts = [SharedSettings, BaselineSettings, *(t.settings for t in TASKS)]
    assert all(issubclass(EvalSettings, p) for p in parts)
    fields = [k for p in parts for k in p.model_fields]
    assert len(fields) == len(set(fields))  # no key in two parts
    assert set(fields) == set(EvalSettings.model_fields)


@pytest.mark.parametrize("env", ["base", "gpu", "photos", "smoke"])
def test_every_conf_evaluation_key_reaches_the_settings(env) -> None:
    from dinoflow.jobs.evaluate import evaluation_settings

    params = {}
    for name in dict.fromkeys(["base", env]):
        text = (ROOT / "conf" / name / "parameters_evaluation.yml").read_text()
        params.update(yaml.safe_load(text)["evaluation"])
    params.pop("model")
    if params.get("device") == "auto":
        params["device"] = "cpu"  # the test machine may have no GPU
    cfg = evaluation_settings(params, "out", (0.5,), (0.5,), 28)
    for key, value in params.items():
        got = getattr(cfg, key)
        if key != "image_size":  # null: the pretraining size, here 28
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert cfg.image_size == (params["image_size"] or 28)


@pytest.mark.parametrize(
    ("model", "bad", "key"),
    [
        (SharedSettings, {"crop_ratio": 1.5}, "crop_ratio"),
        (SharedSettings, {"precision": "fp16"}, "precision"),
        (SharedSettings, {"mean": (0.5, 0.5)}, "evaluation.mean"),
        (BaselineSettings, {"baselines": ("random", "imagenet")}, "evaluation.baselines"),
        (LabelFreeSettings, {"labelfree_max_images": 1}, "evaluation.labelfree_max_images"),
        (LabelFreeSettings, {"views_blur_kernel": 4}, r"evaluation.views_\*.*blur kernel"),
        (ClassificationSettings, {"knn_temperature": 0}, "knn_temperature"),
        (ClassificationSettings, {"knn_primary_k": 5}, "evaluation.knn_primary_k"),
        (ClassificationSettings, {"linear_lrs": (0.1, -1.0)}, "linear_lrs"),
        (SegmentationSettings, {"seg_source": "folder"}, "evaluation.seg_folder"),
        (SegmentationSettings, {"seg_epochs": 0}, "seg_epochs"),
        (PictureSettings, {"pca_foreground_threshold": "half"}, "pca_foreground_threshold"),
    ],
)
def test_each_settings_model_names_the_bad_key(model, bad, key) -> None:
    model()  # the defaults are valid
    with pytest.raises(ValidationError, match=key):
        model(**bad)
    with pytest.raises(ValidationError, match=key):
        EvalSettings(**bad)  # and the composed settings say the same


def test_a_task_settings_model_holds_only_its_keys() -> None:
    with pytest.raises(ValidationError, match="n_pictures"):
        PictureSettings(n_pictures=3)  # a shared key: SharedSettings holds it
    with pytest.raises(ValidationError, match="seg_epochs"):
        ClassificationSettings(seg_epochs=3)
