"""The promotion metric: auto with and without labels, refused before any work when it cannot
exist, and lower-is-better metrics compared the right way round (real SQLite MLflow store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinoflow.config import ConfigError
from dinoflow.registry import (
    CHALLENGER,
    CHAMPION,
    RegistrationConfig,
    promote,
    resolve_registration_metric,
)


def test_auto_is_knn_with_labels_and_view_retrieval_without():
    assert RegistrationConfig().metric == "auto"
    assert resolve_registration_metric("auto", labelled=True) == "knn_top1"
    assert resolve_registration_metric("auto", labelled=False) == "view_retrieval_top1"
    for key in ("rankme", "alignment", "uniformity", "view_retrieval_top1"):
        assert resolve_registration_metric(key, labelled=False) == key
    assert resolve_registration_metric("knn_top1_k200", labelled=True) == "knn_top1_k200"


def test_a_metric_that_cannot_exist_is_refused_naming_the_key():
    for metric in ("knn_top1", "linear_top1", "seg_miou"):
        with pytest.raises(ConfigError, match=r"^registration\.metric: '.*' needs labels"):
            resolve_registration_metric(metric, labelled=False)
    for metric in ("knn_tpo1", "baseline_random_knn_top1", "loss"):
        with pytest.raises(ConfigError, match=r"^registration\.metric: .* is not a metric"):
            resolve_registration_metric(metric, labelled=True)
    with pytest.raises(ValueError, match="not a metric the evaluation writes"):
        RegistrationConfig(metric="accuracy")


def test_unlabelled_folder_with_knn_metric_stops_before_any_work(tmp_path):
    """The registration node checks the metric against the data before loading anything."""
    from mlflow import MlflowClient
    from PIL import Image

    from dinoflow.pipelines.registration.nodes import register_backbone

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = {"source": "image_folder", "path": str(tmp_path)}
    summary = {"teacher_backbone": str(tmp_path / "missing.pt")}  # never read
    with pytest.raises(ConfigError, match="registration.metric: 'knn_top1' needs labels"):
        register_backbone(summary, None, {"metric": "knn_top1"}, data)  # stops before the evaluation
    assert MlflowClient().search_registered_models() == []
    assert MlflowClient().search_experiments(filter_string="name = 'dinoflow'") == []


@pytest.fixture
def versions(tmp_path: Path):
    """A registered model with 4 versions in the test's own SQLite store (no training needed)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model("m")
    source = tmp_path / "model"
    source.mkdir()
    for _ in range(4):
        client.create_model_version("m", str(source))
    return client


def test_lower_is_better_metric_promotes_the_lower_value(versions):
    client = versions
    first = promote("1", 0.50, "data", "m", client=client, metric_name="alignment")
    assert (first["alias"], first["reason"]) == (CHAMPION, "no champion yet")
    better = promote("2", 0.30, "data", "m", client=client, metric_name="alignment")
    assert better["alias"] == CHAMPION and better["champion_metric"] == 0.50
    assert better["reason"] == "beats champion v1: alignment 0.3000 < 0.5000"
    worse = promote("3", 0.40, "data", "m", client=client, metric_name="alignment")
    assert worse["alias"] == CHALLENGER and "0.4000 >= 0.3000" in worse["reason"]
    v2 = client.get_model_version("m", "2")
    assert v2.tags["dinoflow.alignment"] == repr(0.30)
    assert v2.tags["dinoflow.promotion_metric"] == "alignment"
    # a metric the champion was not promoted on cannot be compared: it stays
    other = promote("4", 0.99, "data", "m", client=client, metric_name="view_retrieval_top1")
    assert other["alias"] == CHALLENGER
    assert other["reason"] == "champion v2 has no recorded dinoflow.view_retrieval_top1"
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == "2"


def test_higher_is_better_with_margin(versions):
    client = versions
    promote("1", 0.50, "d", "m", client=client, metric_name="view_retrieval_top1")
    close = promote("2", 0.505, "d", "m", 0.01, client=client, metric_name="view_retrieval_top1")
    assert close["alias"] == CHALLENGER  # 0.505 does not beat 0.50 + 0.01
    clear = promote("3", 0.52, "d", "m", 0.01, client=client, metric_name="view_retrieval_top1")
    assert clear["alias"] == CHAMPION and clear["reason"].startswith("beats champion v1")


def test_the_policy_decides_without_mlflow():
    """``promotion.decide`` is the rule ``promote`` records; the policy, the card and the model
    import no MLflow (unpickling a registered version imports dinoflow.registry)."""
    import subprocess
    import sys

    from dinoflow.registry.promotion import decide

    assert decide("2", "knn_top1", 0.5, "d", None, None, None) == (True, "no champion yet")
    assert decide("2", "knn_top1", 0.5, "d", "2", 0.9, "d") == (True, "already the champion")
    assert decide("2", "knn_top1", 0.5, "d", "1", None, "d") == (
        False, "champion v1 has no recorded dinoflow.knn_top1")  # fmt: skip
    assert decide("2", "knn_top1", 0.9, "d", "1", 0.4, "e") == (
        False, "not comparable: champion v1 was evaluated on other data (e != d)")  # fmt: skip
    assert decide("2", "alignment", 0.3, "d", "1", 0.4, "d", 0.05) == (
        True, "beats champion v1: alignment 0.3000 < 0.4000 - 0.05")  # fmt: skip
    assert decide("2", "knn_top1", 0.41, "d", "1", 0.4, "d", 0.05)[0] is False
    script = ("import sys, dinoflow.registry, dinoflow.registry.card, dinoflow.registry.promotion\n"
              "print('mlflow' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
