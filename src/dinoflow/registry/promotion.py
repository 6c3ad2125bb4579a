"""The promotion policy, pure (no MLflow): which metric decides, and whether a new version beats
the champion.

A new version takes the alias ``champion`` only if its ``registration.metric`` beats the current
champion's *on the same evaluation data* (same ``eval_data_id``); otherwise it gets
``challenger``. The metric defaults to ``auto``: kNN top-1 with labels, view retrieval top-1
without (``resolve_registration_metric``); lower-is-better metrics (alignment, uniformity) are
compared the other way round. ``dinoflow.registry.store.promote`` reads the champion from the
registry, asks ``decide`` and records the decision.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator

from dinoflow.config import ConfigError, Strict
from dinoflow.evaluation.labelfree import LABEL_FREE_KEYS
from dinoflow.evaluation.metric_spec import base_name, direction, is_known_metric, needs_labels

__all__ = [
    "AUTO_LABEL_FREE_METRIC",
    "AUTO_LABELLED_METRIC",
    "AUTO_METRIC",
    "CHALLENGER",
    "CHAMPION",
    "MODEL_NAME",
    "RegistrationConfig",
    "compare",
    "decide",
    "metric_tag",
    "metric_why",
    "resolve_registration_metric",
]

MODEL_NAME = "dinoflow-backbone"
CHAMPION = "champion"
CHALLENGER = "challenger"
AUTO_METRIC = "auto"
# ``auto`` picks these. Without labels: view retrieval top-1, because it is higher-is-better and in
# [0, 1] like kNN top-1, and it needs both things a good backbone has: views of one image close
# (alignment alone is won by a collapsed network) and different images apart (uniformity and
# RankMe alone are won by a random network); a collapsed network scores ~1/N.
AUTO_LABELLED_METRIC = "knn_top1"
AUTO_LABEL_FREE_METRIC = "view_retrieval_top1"


class RegistrationConfig(Strict):
    """``params:registration`` (conf/base/parameters_registration.yml)."""

    model_name: str = MODEL_NAME
    # key in metrics.json that promotion compares; "auto": knn_top1 with labels,
    # view_retrieval_top1 without (resolve_registration_metric); alignment/uniformity: lower wins
    metric: str = AUTO_METRIC
    min_improvement: float = Field(0.0, ge=0.0)  # champion moves only if it beats old by this
    pictures: list[str] = Field(default_factory=list)  # glob patterns of PNGs for the model card
    input_example_batch: int = Field(2, ge=1)
    log_code: bool = True  # ship src/dinoflow with the model (code_paths)
    # the pyfunc embedding service over each registered version (same aliases); None: none
    embedder_name: str | None = "dinoflow-embedder"

    @field_validator("metric")
    @classmethod
    def _promotable(cls, value: str) -> str:
        if value == AUTO_METRIC or (is_known_metric(value) and base_name(value) == value):
            return value
        raise ValueError(
            f"{value!r} is not a metric the evaluation writes: choose auto, one of "
            f"{', '.join(LABEL_FREE_KEYS)} (any data), or with labels knn_top1, knn_top5, "
            "knn_top1_k<k>, linear_top1, seg_miou, ..."
        )


def resolve_registration_metric(metric: str, labelled: bool) -> str:
    """The metrics.json key promotion compares, decided before any work.

    metric: ``registration.metric`` ("auto" or a key); labelled: whether the data has labels
    (``dinoflow.evaluation.metric_spec.data_is_labelled``). "auto" -> knn_top1 with labels,
    view_retrieval_top1 without. Raises ConfigError naming ``registration.metric`` when the
    metric cannot exist for the data (a labelled metric on unlabelled data) or is unknown.
    """
    if metric == AUTO_METRIC:
        return AUTO_LABELLED_METRIC if labelled else AUTO_LABEL_FREE_METRIC
    try:
        RegistrationConfig(metric=metric)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"registration.metric: {msg}") from None
    if needs_labels(metric) and not labelled:
        raise ConfigError(
            f"registration.metric: {metric!r} needs labels, and this data has none (labels are the "
            "first-level sub-folders, at least 2 of them, every image in one); use auto or one of "
            f"{', '.join(LABEL_FREE_KEYS)}"
        )
    return metric


def metric_why(metric: str, requested: str, labelled: bool | None) -> str:
    """One line for the model card and the logs: the promotion metric and why it was chosen."""
    better = "higher" if direction(metric) == "higher" else "lower"
    if requested != AUTO_METRIC:
        return f"`{metric}` (registration.metric; {better} is better)"
    data = "labelled data" if labelled else "no labels"
    return f"`{metric}` (registration.metric auto: {data}; {better} is better)"


def metric_tag(metric_name: str) -> str:
    """The version tag that holds a promotion metric's value ("dinoflow.knn_top1", ...)."""
    return f"dinoflow.{metric_name}"


def compare(
    metric_name: str, new: float, old: float, min_improvement: float, champion: Any
) -> tuple[bool, str]:
    """(promoted, reason): does ``new`` beat the champion's ``old`` by more than min_improvement,
    in the metric's direction?"""
    margin = f" + {min_improvement}" if min_improvement else ""
    if direction(metric_name) == "higher":
        if new > old + min_improvement:
            return True, f"beats champion v{champion}: {new:.4f} > {old:.4f}{margin}"
        return False, f"does not beat champion v{champion}: {new:.4f} <= {old:.4f}{margin}"
    margin = f" - {min_improvement}" if min_improvement else ""
    if new < old - min_improvement:
        return True, f"beats champion v{champion}: {metric_name} {new:.4f} < {old:.4f}{margin}"
    return False, (
        f"does not beat champion v{champion}: {metric_name} {new:.4f} >= {old:.4f}{margin}"
    )


def decide(
    version: str,
    metric_name: str,
    metric_value: float,
    data_id: str,
    champion: str | None,
    champion_metric: float | None,
    champion_data: str | None,
    min_improvement: float = 0.0,
) -> tuple[bool, str]:
    """(promoted, reason) for ``version`` against the champion version ``champion`` (None: none),
    whose recorded ``champion_metric`` (None: none of this metric) was measured on
    ``champion_data``. A champion measured on other data is not comparable: the new version
    then stays challenger."""
    if champion is None:
        return True, "no champion yet"
    if champion == version:
        return True, "already the champion"
    if champion_metric is None:
        return False, f"champion v{champion} has no recorded {metric_tag(metric_name)}"
    if champion_data != data_id:
        return False, (
            f"not comparable: champion v{champion} was evaluated on other data "
            f"({champion_data} != {data_id})"
        )
    return compare(metric_name, metric_value, champion_metric, min_improvement, champion)
