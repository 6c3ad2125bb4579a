"""Registration: two real tiny backbones, real kNN numbers, champion/challenger in a tmp store.

The kNN numbers come from the library's evaluation (extract_features + knn_classify) on a tiny
labelled set where a random-init ViT separates the classes and a ViT whose patch embedding is
zeroed (every image gives the same tokens) cannot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.data import Split, data_identity
from dinoflow.evaluation.features import extract_features
from dinoflow.evaluation.knn import knn_classify
from dinoflow.models.vit import DinoVisionTransformer, save_backbone
from dinoflow.registry import (
    CHALLENGER,
    CHAMPION,
    MODEL_NAME,
    RegisteredBackbone,
    model_card,
)

MEAN, STD, SIZE = [0.3], [0.35], 8


def _images(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """3 classes of 8x8 grey images: dark, mid-grey, bright (levels 30, 120, 210), plus noise."""
    imgs = [rng.integers(0, 40, (SIZE, SIZE)) + level for level in (30, 120, 210)
            for _ in range(n_per_class)]  # fmt: skip
    labels = np.repeat(np.arange(3), n_per_class)
    return np.asarray(imgs, dtype=np.uint8), labels.astype(np.int64)


def _split(images: np.ndarray, labels: np.ndarray, name: str) -> Split:
    ids = [f"{name}/{i:04d}" for i in range(len(labels))]
    return Split(ids=ids, labels=labels, class_names=["top", "bottom", "left"], channels=1,
                 images=images, name=name)  # fmt: skip


def _backbone(informative: bool) -> DinoVisionTransformer:
    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=SIZE, patch_size=4, in_chans=1, embed_dim=16, depth=1,
                                num_heads=2, layerscale_init=None)  # fmt: skip
    if not informative:
        with torch.no_grad():  # every image -> the same tokens: kNN can only guess
            vit.vit.patch_embed.proj.weight.zero_()
    return vit.eval()


def _knn_top1(vit: DinoVisionTransformer, train: Split, test: Split) -> float:
    wrapped = RegisteredBackbone(vit, MEAN, STD, SIZE, 1)
    feats = {n: extract_features(wrapped, s, SIZE, MEAN, STD, batch_size=64, progress=False)
             for n, s in (("train", train), ("test", test))}  # fmt: skip
    out = knn_classify(feats["train"].cls_last, feats["train"].labels, feats["test"].cls_last,
                       feats["test"].labels, n_classes=3, ks=(20,))  # fmt: skip
    return out["top1_k20"]




def test_registered_backbone_matches_backbone_and_preprocessing() -> None:
    vit = _backbone(True)
    model = RegisteredBackbone(vit, MEAN, STD, SIZE, 1).eval()
    imgs = np.random.default_rng(1).integers(0, 256, (2, 4, 4), dtype=np.uint8)
    x = model.preprocess(imgs)
    assert x.shape == (2, 1, SIZE, SIZE) and x.dtype == torch.float32
    # a constant image stays constant after resizing: (v / 255 - mean) / std exactly
    flat = model.preprocess(np.full((1, 4, 4), 51, dtype=np.uint8))
    torch.testing.assert_close(flat, torch.full((1, 1, SIZE, SIZE), (51 / 255 - 0.3) / 0.35))
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x))
        torch.testing.assert_close(model.forward_patches(x), vit.forward_patches(x))
        assert model.forward_patches(x).shape == (2, 4, 16)
        torch.testing.assert_close(model.embed(imgs), vit(x))
    with pytest.raises(TypeError, match="uint8"):
        model.preprocess(torch.zeros(1, 1, 8, 8))


def test_data_identity_names_the_split_exactly() -> None:
    import hashlib

    a = data_identity(["test/000001", "test/000002"])
    # the identity champions recorded before (sha256 of the newline-joined ids): still comparable
    assert a == hashlib.sha256(b"test/000001\ntest/000002").hexdigest()[:16]
    assert a != data_identity(["test/000001", "test/000003"])
    assert a != data_identity(["test/000001"])


def test_model_card_lists_data_params_metrics_pictures() -> None:
    decision = {"version": "3", "alias": CHAMPION, "reason": "beats champion v2: 0.9 > 0.5",
                "metric": 0.9, "champion_metric": 0.5, "champion_version": "2",
                "eval_data_id": "abc"}  # fmt: skip
    summary = {"data": {"source": "fashion_mnist", "seed": 0}, "mean": [0.3], "std": [0.35],
               "image_size": 28, "channels": 1, "n_train_images": 123, "steps": 7,
               "final": {"loss/total": 1.5}, "fingerprint": "f00"}  # fmt: skip
    card = model_card(MODEL_NAME, decision, summary, {"knn_top1": 0.9, "eval_data_id": "abc"},
                      {"curated_data_md5": "d41d8", "git_commit": "c0ffee"}, {"depth": 2},
                      ["training_curves.png"])  # fmt: skip
    assert card.startswith("# dinoflow-backbone v3")
    for text in ("`champion`", "| knn_top1 | 0.9000 |", "`d41d8`", "`c0ffee`", "| depth | 2 |",
                 "training images: 123", "final loss/total: 1.5000", "0.5000 (v2)",
                 "![training_curves](training_curves.png)", 'models:/dinoflow-backbone/3'):
        assert text in card, text


@pytest.mark.slow  # four registrations + a fresh interpreter importing torch and mlflow
def test_champion_goes_to_the_better_model_and_loads_in_a_fresh_process(
    store: str, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from dinoflow.pipelines.datasets import ReportSet
    from dinoflow.pipelines.hooks import tag_parent_runs
    from dinoflow.pipelines.registration.nodes import register_backbone
    from dinoflow.results import EvaluationReport

    rng = np.random.default_rng(0)
    train, test = _split(*_images(10, rng), "train"), _split(*_images(5, rng), "test")
    data_id = data_identity(test.ids)
    models = {"better": _backbone(True), "worse": _backbone(False), "retrained": _backbone(True)}
    with torch.no_grad():  # the better model trained a little further: other weights
        models["retrained"].vit.norm.weight.add_(0.01)
    knn = {name: _knn_top1(vit, train, test) for name, vit in models.items()}
    assert knn["better"] > 0.9 and knn["worse"] < 0.5, knn  # the premise: a real gap

    client = MlflowClient()
    params = {"min_improvement": 0.0}
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "pca_features.png").write_bytes(b"\x89PNG fake")
    files = {"pca_features": "pictures/pca_features.png", "details": "pictures/details.json"}

    def register(name: str, data: str | None = None) -> dict:
        """One pretrain run, one evaluation run, one registration run, as in `dvc repro`.

        As the evaluation pipeline writes them: the data id and the pictures are in the report,
        the evaluation run is found by its tags; ``data`` puts another id in metrics.json.
        """
        path = tmp_path / name / "teacher_backbone.pt"
        save_backbone(models[name], path)
        with mlflow.start_run(run_name=f"pretrain {name}") as pre:
            mlflow.set_tags({"dinoflow.curated_data_md5": f"md5-{name}",
                             "dinoflow.git_commit": "abc123", "dinoflow.env": "test"})  # fmt: skip
        with mlflow.start_run(run_name=f"evaluation {name}") as ev:
            mlflow.log_metric("knn_top1", knn[name])
            mlflow.set_tags({"dinoflow.pretrain_run_id": pre.info.run_id,
                             "dinoflow.eval_data_id": data or data_id})  # fmt: skip
        summary = {"teacher_backbone": str(path), "mean": MEAN, "std": STD, "image_size": SIZE,
                   "channels": 1, "mlflow_run_id": pre.info.run_id, "fingerprint": name,
                   "data": {"source": "synthetic"}, "n_train_images": len(train),
                   "run_dir": str(path.parent), "steps": 1, "final": {}}  # fmt: skip
        metrics = {"knn_top1": knn[name], "knn_top1_k10": 0.5}
        if data is not None:
            metrics["eval_data_id"] = data
        report = EvaluationReport(model=str(path), eval_data_id=data_id, files=files)
        with mlflow.start_run(run_name=f"registration {name}") as reg:
            # what LineageHooks.before_node_run does with the node's inputs under Kedro
            parents = tag_parent_runs({"pretrain_summary": summary, "evaluation": metrics, "x": 1})
            assert parents == {"dinoflow.pretrain_run_id": pre.info.run_id}
            evaluation = ReportSet(metrics, report, path.parent)
            out = register_backbone(summary, evaluation, params).model_dump()
        if not out["reason"].startswith("already registered"):
            assert out["lineage"]["evaluation_run_id"] == ev.info.run_id
        out["run_id"] = reg.info.run_id
        out["pretrain_run_id"] = pre.info.run_id
        return out

    assert tag_parent_runs({"evaluation": {"mlflow_run_id": "x"}}) == {}  # no active run: no tags
    with mlflow.start_run():
        assert tag_parent_runs({"evaluation": {"mlflow_run_id": "e1"}}) == {
            "dinoflow.evaluation_run_id": "e1"}  # fmt: skip
    first = register("worse")
    assert (first["version"], first["alias"], first["champion_metric"]) == ("1", CHAMPION, None)
    second = register("better")
    assert (second["version"], second["alias"]) == ("2", CHAMPION)
    assert second["champion_metric"] == knn["worse"] and second["metric"] == knn["better"]
    assert second["reason"].startswith("beats champion v1")
    # the same weights again: no second version, the first one's decision stands
    again = register("worse")
    assert again["version"] == "1" and again["reason"].startswith("already registered as v1")
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2
    with torch.no_grad():
        models["worse"].vit.norm.bias.add_(0.01)  # now other weights: a new version
    third = register("worse")
    assert (third["version"], third["alias"]) == ("3", CHALLENGER)
    assert third["champion_metric"] == knn["better"] and third["metric"] == knn["worse"]
    # a higher number on other evaluation data does not dethrone the champion
    other = register("retrained", data=data_id + "-other")
    assert (other["version"], other["alias"]) == ("4", CHALLENGER)
    assert other["reason"].startswith("not comparable")

    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHALLENGER).version) == "4"
    for v in client.search_model_versions(f"name='{MODEL_NAME}'"):  # each one finished
        assert v.tags["dinoflow.registration_complete"] == "true" and "dinoflow.decision" in v.tags
    # both numbers and the decision are logged on the registration run
    run = client.get_run(third["run_id"])
    assert run.data.metrics["registration/metric"] == knn["worse"]
    assert run.data.metrics["registration/champion_metric"] == knn["better"]
    assert run.data.metrics["registration/promoted"] == 0.0
    assert run.data.tags["dinoflow.registration_decision"] == CHALLENGER
    assert run.data.tags["dinoflow.pretrain_run_id"] == third["pretrain_run_id"]
    decision = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=third["run_id"], artifact_path="registration/decision.json")).read_text())  # fmt: skip
    assert decision["alias"] == CHALLENGER and decision["champion_version"] == "2"
    # lineage and the card on the registered version
    v2 = client.get_model_version(MODEL_NAME, "2")
    assert v2.run_id == second["run_id"]
    assert v2.tags["dinoflow.curated_data_md5"] == "md5-better"
    assert v2.tags["dinoflow.pretrain_run_id"] == second["pretrain_run_id"]
    assert v2.tags["dinoflow.knn_top1"] == repr(knn["better"]) and v2.tags["dinoflow.eval_data_id"] == data_id
    assert v2.description.startswith("# dinoflow-backbone v2") and "`md5-better`" in v2.description
    arts = {a.path for a in client.list_artifacts(second["run_id"], "model_card")}
    assert arts == {"model_card/model_card.md", "model_card/pca_features.png"}

    # a fresh process loads the champion and embeds images exactly as the better backbone does
    images = np.random.default_rng(2).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import mlflow, numpy as np, torch\n"
        f"m = mlflow.pytorch.load_model('models:/{MODEL_NAME}@{CHAMPION}')\n"
        "imgs = np.load('images.npy')\n"
        "x = m.preprocess(imgs)\n"
        "with torch.no_grad():\n"
        "    np.save('cls.npy', m(x).numpy()); np.save('patches.npy', m.forward_patches(x).numpy())\n"
        "print(type(m).__module__, type(m).__name__, m.image_size, list(m.mean), list(m.std))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "dinoflow.registry RegisteredBackbone 8 [0.3] [0.35]"
    expected = RegisteredBackbone(models["better"], MEAN, STD, SIZE, 1).eval()
    x = expected.preprocess(images)
    with torch.no_grad():
        np.testing.assert_allclose(np.load(tmp_path / "cls.npy"), expected(x).numpy(), atol=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / "patches.npy"),
                                   expected.forward_patches(x).numpy(), atol=1e-6)  # fmt: skip
    assert np.load(tmp_path / "cls.npy").shape == (3, 16)
    assert np.load(tmp_path / "patches.npy").shape == (3, 4, 16)
