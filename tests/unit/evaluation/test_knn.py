"""Weighted kNN (DINOv2 protocol) against a brute-force loop, and on real Fashion-MNIST pixels."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.evaluation.knn import knn_classify, knn_predict

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def brute_force_scores(train, labels, test, n_classes, k, temperature):
    """Plain Python: cosine to every labelled train row, sort, sum exp(sim/T) of the first k per class."""
    out = []
    for q in test.tolist():
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for x, y in zip(train.tolist(), labels.tolist(), strict=True):
            if y < 0:
                continue
            xn = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(q, x, strict=True)) / (qn * xn), y))
        sims.sort(key=lambda t: -t[0])
        scores = [0.0] * n_classes
        for s, y in sims[:k]:
            scores[y] += math.exp(s / temperature)
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(53, 6, generator=g)
    labels = torch.randint(0, 4, (53,), generator=g)
    labels[[3, 17, 40]] = -1  # unlabelled rows must not vote
    test = torch.randn(19, 6, generator=g)
    test_labels = torch.randint(0, 4, (19,), generator=g)
    return train, labels, test, test_labels


def test_scores_equal_brute_force_with_chunking(data):
    train, labels, test, _ = data
    ks = (1, 3, 10, 50)
    # chunks smaller than both sets exercise the running top-k merge across train chunks
    scores = knn_predict(train, labels, test, 4, ks, temperature=0.07, test_chunk=4, train_chunk=7)
    for k in ks:
        expected = brute_force_scores(train, labels, test, 4, k, 0.07)
        torch.testing.assert_close(scores[k].double(), expected, rtol=1e-4, atol=1e-6)


def test_accuracy_equals_brute_force(data):
    train, _, test, _ = data
    # 8 classes, so that top-5 can miss (with 4 classes every label is in the top 5)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 8, (len(train),), generator=g)
    labels[[3, 17, 40]] = -1
    test_labels = torch.randint(0, 8, (len(test),), generator=g)
    ks = (1, 5, 20, 50)
    got = knn_classify(
        train, labels, test, test_labels, 8, ks, temperature=0.1, test_chunk=6, train_chunk=11
    )
    for k in ks:
        expected = brute_force_scores(train, labels, test, 8, k, 0.1)
        top1 = sum(
            int(expected[i].argmax()) == int(test_labels[i]) for i in range(len(test))
        ) / len(test)
        assert got[f"top1_k{k}"] == pytest.approx(top1)
    # top-5 where no class scores 0 (k = all 50 labelled rows): no tie decides the 5 classes
    assert bool((expected > 0).all())
    order = expected.argsort(dim=1, descending=True)[:, :5]
    top5 = sum(int(test_labels[i]) in order[i].tolist() for i in range(len(test))) / len(test)
    assert got["top5_k50"] == pytest.approx(top5)
    assert got["top1_k50"] < top5 < 1.0  # the premise: top-5 adds hits and still misses some


def test_hand_example_weights_decide():
    # two close neighbours of class 1 outvote one closer neighbour of class 0 only at k >= 2
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.9, -0.1], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, test, 2, ks=(1, 3), temperature=0.07)
    assert scores[1].argmax().item() == 0
    assert scores[3].argmax().item() == 1
    cos = 0.9 / math.sqrt(0.82)
    assert scores[3][0, 1].item() == pytest.approx(2 * math.exp(cos / 0.07), rel=1e-5)
    assert scores[3][0, 0].item() == pytest.approx(math.exp(1 / 0.07), rel=1e-5)


def test_unlabelled_test_rows_are_not_counted(data):
    train, labels, test, test_labels = data
    masked = test_labels.clone()
    masked[:9] = -1
    full = knn_classify(train, labels, test[9:], test_labels[9:], 4, (5,))
    partial = knn_classify(train, labels, test, masked, 4, (5,))
    assert partial == full


def _read_idx(path: Path) -> np.ndarray:
    from dinoflow.data.fashion_mnist import read_idx

    return read_idx(path)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
def test_raw_pixels_on_fashion_mnist_well_above_chance():
    def find(stem):
        return next(p for p in (FMNIST / f"{stem}.gz", FMNIST / stem) if p.exists())

    x_train = _read_idx(find("train-images-idx3-ubyte"))[:2000]
    y_train = _read_idx(find("train-labels-idx1-ubyte"))[:2000]
    x_test = _read_idx(find("t10k-images-idx3-ubyte"))[:500]
    y_test = _read_idx(find("t10k-labels-idx1-ubyte"))[:500]
    train = torch.from_numpy(x_train.reshape(2000, -1).astype(np.float32) / 255)
    test = torch.from_numpy(x_test.reshape(500, -1).astype(np.float32) / 255)
    metrics = knn_classify(
        train,
        torch.from_numpy(y_train.astype(np.int64)),
        test,
        torch.from_numpy(y_test.astype(np.int64)),
        10,
    )
    assert metrics["top1_k20"] > 0.7  # chance is 0.1; raw-pixel kNN on this subset gets ~0.75-0.8
    assert metrics["top5_k20"] > metrics["top1_k20"]
    assert set(metrics) == {f"top{t}_k{k}" for t in (1, 5) for k in (10, 20, 100, 200)}


def test_pixels_knn_is_the_raw_pixel_protocol_on_split_objects():
    """The online reference (pixels_knn on bank/query splits) equals knn_classify on the images
    flattened and scaled to [0, 1] by hand."""
    from dinoflow.data import Split
    from dinoflow.evaluation.knn import pixels_knn

    def find(stem):
        return next(p for p in (FMNIST / f"{stem}.gz", FMNIST / stem) if p.exists())

    images = [_read_idx(find(s))[:n] for s, n in (("train-images-idx3-ubyte", 1000),
                                                   ("t10k-images-idx3-ubyte", 300))]
    labels = [_read_idx(find(s))[:n].astype(np.int64) for s, n in (("train-labels-idx1-ubyte", 1000),
                                                                    ("t10k-labels-idx1-ubyte", 300))]
    bank, queries = (Split(ids=[str(i) for i in range(len(x))], labels=y,
                           class_names=[str(c) for c in range(10)], channels=1, images=x)
                     for x, y in zip(images, labels, strict=True))
    got = pixels_knn(bank, queries, image_size=28, ks=(20,))
    flat = [torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255) for x in images]
    expected = knn_classify(flat[0], torch.from_numpy(labels[0]), flat[1], torch.from_numpy(labels[1]),
                            10, ks=(20,))
    assert got == pytest.approx(expected)
    assert got["top1_k20"] > 0.65  # chance is 0.1
