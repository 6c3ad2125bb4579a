"""Label-free feature quality on the test split, labels or not (``dinoflow.evaluation.labelfree``):
rankme (>= 1), alignment (in [0, 4]), uniformity (in [-4, 0]), view_retrieval_top1, and the same
four prefixed ``baseline_random_`` for the random-init twin (measured on the same views)."""

from __future__ import annotations

from pydantic import model_validator

from dinoflow.config import Strict
from dinoflow.evaluation.labelfree import ViewSettings, held_out_indices, label_free_metrics
from dinoflow.evaluation.tasks.context import EvalContext, EvaluationTask, TaskResult

# the report's own mean/std are checked by SharedSettings; the views only need a valid pair
_CHECK_MEAN_STD = ((0.5,), (0.5,))


class LabelFreeSettings(Strict):
    """The images and the two views of the label-free metrics."""

    # label-free metrics (labelfree.py) on at most this many test images (a fixed-seed sample)
    labelfree_max_images: int | None = 2000
    # their two views: DINOv2's global crops 1 and 2 (labelfree.ViewSettings; reference defaults)
    views_scale: tuple[float, float] = ViewSettings.scale
    views_flip_p: float = ViewSettings.flip_p
    views_jitter: tuple[float, float, float, float] = ViewSettings.jitter
    views_jitter_p: float = ViewSettings.jitter_p
    views_grayscale_p: float = ViewSettings.grayscale_p
    views_blur_kernel: int = ViewSettings.blur_kernel
    views_blur_sigma: tuple[float, float] = ViewSettings.blur_sigma
    views_blur_p: tuple[float, float] = ViewSettings.blur_p
    views_solarize_p: float = ViewSettings.solarize_p

    @model_validator(mode="after")
    def _check_label_free(self) -> LabelFreeSettings:
        if self.labelfree_max_images is not None and self.labelfree_max_images < 2:
            raise ValueError(
                f"evaluation.labelfree_max_images: must be >= 2 (or null: the whole test split), "
                f"got {self.labelfree_max_images}"
            )
        try:
            self.view_settings().augmentation(max(self.views_blur_kernel, 8), *_CHECK_MEAN_STD)
        except ValueError as exc:
            raise ValueError(f"evaluation.views_*: {exc}") from None
        return self

    def view_settings(self) -> ViewSettings:
        """The two views of the label-free metrics, from the ``views_*`` keys."""
        return ViewSettings(
            scale=tuple(self.views_scale),
            flip_p=self.views_flip_p,
            jitter=tuple(self.views_jitter),
            jitter_p=self.views_jitter_p,
            grayscale_p=self.views_grayscale_p,
            blur_kernel=self.views_blur_kernel,
            blur_sigma=tuple(self.views_blur_sigma),
            blur_p=tuple(self.views_blur_p),
            solarize_p=self.views_solarize_p,
        )


def run(context: EvalContext, settings: LabelFreeSettings) -> TaskResult:
    """The four label-free metrics of the backbone (and its random-init twin) on the test split."""
    shared = context.settings
    backbones = {"": context.backbone}
    if context.baselines.random is not None:
        backbones["baseline_random_"] = context.baselines.random
    held_out = context.splits["test"]
    size = shared.image_size or int(held_out.load(0).shape[-1])
    with context.timer("label_free"):
        found = label_free_metrics(
            backbones,
            held_out,
            size,
            shared.mean,
            shared.std,
            settings.view_settings(),
            max_images=settings.labelfree_max_images,
            seed=shared.seed,
            batch_size=shared.batch_size,
            device=shared.device,
            progress=shared.progress,
            precision=shared.precision,
            crop_ratio=shared.crop_ratio,
        )
    metrics = {f"{prefix}{k}": v for prefix, numbers in found.items() for k, v in numbers.items()}
    n = len(held_out_indices(len(held_out), settings.labelfree_max_images, shared.seed))
    details = {"label_free": {"split": "test", "images": n, "image_size": size}}
    return TaskResult(metrics=metrics, details=details)


TASK = EvaluationTask("label_free", LabelFreeSettings, run)
