"""Linear probe: candidates trained together, selection on val only, test read once afterwards."""

import pytest
import torch

from dinoflow.evaluation.features import FeatureSet
from dinoflow.evaluation.linear import VARIANTS, linear_probe, variant_features


def make_split(n: int, seed: int, n_classes: int = 3) -> FeatureSet:
    """Only patch_mean carries the class; CLS features are pure noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    signal = torch.nn.functional.one_hot(labels, 8).float() * 3.0
    return FeatureSet(
        cls_last=torch.randn(n, 8, generator=g),
        cls_last4=torch.randn(n, 32, generator=g),
        patch_mean=signal + 0.5 * torch.randn(n, 8, generator=g),
        labels=labels,
    )


class Spy:
    """Forwards attribute reads to a FeatureSet and records (split name, attribute) in order."""

    def __init__(self, name: str, inner: FeatureSet, events: list) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_events", events)

    def __getattr__(self, attr: str):
        self._events.append((self._name, attr))
        return getattr(self._inner, attr)


LRS = (1e-6, 0.05)


@pytest.fixture(scope="module")
def splits():
    return make_split(300, 0), make_split(120, 1), make_split(120, 2)


@pytest.fixture(scope="module")
def result(splits):
    train, val, test = splits
    return linear_probe(
        train, val, test, n_classes=3, lrs=LRS, epochs=4, batch_size=32, progress=False
    )


def test_selection_picks_the_informative_candidate(result, splits):
    assert len(result["val_accuracies"]) == len(VARIANTS) * len(LRS)
    # the returned head, re-scored on val here, has the reported accuracy, and no candidate
    # before it (variant order, then lr order) is as good: the first best is chosen
    val = splits[1]
    preds = result["head"](variant_features(val, result["best_variant"])).argmax(dim=1)
    val_top1 = float((preds == val.labels).float().mean())
    assert result["val_top1"] == pytest.approx(val_top1)
    names = list(result["val_accuracies"])
    before = names[: names.index(result["best"])]
    assert all(result["val_accuracies"][n] < val_top1 for n in before)
    assert all(acc <= val_top1 for acc in result["val_accuracies"].values())
    assert result["best_variant"].endswith(
        "_avgpool"
    )  # only the pooled patch tokens are informative
    assert result["best_lr"] == 0.05  # 1e-6 cannot move heads initialised at std 0.01
    assert result["val_top1"] > 0.95
    assert result["linear_top1"] > 0.95
    assert result["val_accuracies"]["blocks1_cls_lr0.05"] < 0.6  # noise: near chance (1/3)


def test_reported_test_accuracy_is_the_chosen_head_on_test(result, splits):
    test = splits[2]
    logits = result["head"](variant_features(test, result["best_variant"]))
    preds = logits.argmax(dim=1)
    assert torch.equal(preds, torch.from_numpy(result["test_predictions"]))
    assert result["linear_top1"] == pytest.approx(float((preds == test.labels).float().mean()))


def test_test_split_is_untouched_until_the_choice(splits):
    events: list = []
    train, val, test = (
        Spy(n, s, events) for n, s in zip(("train", "val", "test"), splits, strict=True)
    )
    out = linear_probe(
        train, val, test, n_classes=3, lrs=LRS, epochs=2, batch_size=64, progress=False
    )
    names = [name for name, _ in events]
    first_test = names.index("test")
    last_other = max(i for i, n in enumerate(names) if n != "test")
    assert first_test > last_other  # every train/val read happens before the first test read
    test_fields = {attr for name, attr in events if name == "test"}
    assert test_fields == {"labels", *VARIANTS[out["best_variant"]]}  # the chosen variant only


def test_test_content_cannot_change_the_selection(splits, result):
    train, val, test = splits
    poisoned = FeatureSet(
        cls_last=torch.full_like(test.cls_last, float("nan")),
        cls_last4=torch.full_like(test.cls_last4, float("nan")),
        patch_mean=torch.full_like(test.patch_mean, float("nan")),
        labels=test.labels.flip(0),
    )
    out = linear_probe(
        train, val, poisoned, n_classes=3, lrs=LRS, epochs=4, batch_size=32, progress=False
    )
    assert out["best"] == result["best"]
    assert out["val_accuracies"] == result["val_accuracies"]


def test_raw_pixel_features_have_one_variant(splits):
    train, val, test = (FeatureSet(cls_last=s.patch_mean, labels=s.labels) for s in splits)
    out = linear_probe(train, val, test, lrs=(0.01, 0.1), epochs=2, batch_size=64, progress=False)
    assert set(out["val_accuracies"]) == {"blocks1_cls_lr0.01", "blocks1_cls_lr0.1"}
    assert out["linear_top1"] > 0.9


def test_unlabelled_rows_are_ignored(splits):
    train, val, test = splits
    labels = train.labels.clone()
    labels[::2] = -1  # half the train set unlabelled: must not crash or be used as a class
    half = FeatureSet(train.cls_last, labels, train.cls_last4, train.patch_mean)
    out = linear_probe(
        half, val, test, n_classes=3, lrs=(0.05,), epochs=3, batch_size=32, progress=False
    )
    assert out["linear_top1"] > 0.9
