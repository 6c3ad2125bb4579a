"""Pictures (PCA maps, confusion matrix, segmentation) and the whole report with baselines."""

import json

import numpy as np
import torch
from PIL import Image

from dinoflow.evaluation.pictures import (
    classification_confusion,
    colourise,
    confusion_matrix_figure,
    pca_feature_maps,
    pca_rgb,
    segmentation_figure,
)
from dinoflow.evaluation.report import EvalSettings, evaluate_backbone
from dinoflow.evaluation.tasks.baselines import random_init_like


def png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        return im.size


def minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def test_pca_rgb_recovers_the_three_directions():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2 * 3 * 3, 3, generator=g, dtype=torch.float64)
    # zero-mean, mutually orthogonal coordinates with distinct spreads: the principal axes exactly
    coords = torch.linalg.qr(raw - raw.mean(0))[0] * torch.tensor(
        [10.0, 3.0, 1.0], dtype=torch.float64
    )
    basis, _ = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))  # in R^8
    tokens = (coords @ basis.T + 5.0).float().view(2, 3, 3, 8)
    rgb, foreground = pca_rgb(tokens)
    assert rgb.shape == (2, 3, 3, 3) and bool(foreground.all())
    for c in range(3):  # each channel is one coordinate scaled to [0, 1], up to the PCA sign
        got, want = rgb[..., c].flatten(), minmax(coords[:, c]).float()
        assert torch.allclose(got, want, atol=1e-5) or torch.allclose(got, 1 - want, atol=1e-5)


def test_pca_foreground_threshold_separates_the_object():
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(2, 5, 5, 6)
    tokens[:, 1:4, 1:4] = 4.0 + torch.randn(2, 3, 3, 6, generator=g)  # object in the centre
    tokens += 0.01 * torch.randn(tokens.shape, generator=g)
    rgb, foreground = pca_rgb(tokens, foreground_threshold=0.5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 1:4] = True
    assert torch.equal(foreground, expected.expand(2, 5, 5))
    assert float(rgb[~foreground].abs().max()) == 0.0  # background is black


def test_classification_confusion_hand_example():
    counts = classification_confusion([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_figures_are_written(tmp_path, tiny_backbone):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    path = pca_feature_maps(tiny_backbone(), images, (0.5,), (0.5,), tmp_path / "pca.png")
    width, height = png_size(path)
    assert width > height  # 4 columns, 2 rows
    path = confusion_matrix_figure([0, 1, 2, 2], [0, 1, 1, 2], ["a", "b", "c"], tmp_path / "cm.png")
    png_size(path)
    masks = np.zeros((2, 16, 16), np.int64)
    masks[:, 4:8, 4:8] = 2
    masks[0, 0, 0] = 255
    path = segmentation_figure(
        images[:2], masks, np.zeros_like(masks), tmp_path / "seg" / "s.png", 3
    )
    png_size(path)
    colours = colourise(masks[0], 3)
    assert colours[0, 0].tolist() == [1.0, 1.0, 1.0] and colours[1, 1].tolist() == [0.0, 0.0, 0.0]


class Split:
    """Grayscale 8x8 images whose class sets which quadrant is bright; in memory like Fashion-MNIST."""

    class_names = ["tl", "tr", "bl", "br"]

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = (np.arange(n) % 4).astype(np.int64)
        self.images = rng.integers(0, 40, (n, 8, 8)).astype(np.uint8)
        for i, c in enumerate(self.labels):
            r, q = divmod(int(c), 2)
            self.images[i, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 200

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).unsqueeze(0)


def test_evaluate_backbone_reports_every_metric_and_baseline(tmp_path, tiny_backbone):
    torch.manual_seed(0)
    splits = {"train": Split(80, 0), "val": Split(24, 1), "test": Split(24, 2)}
    cfg = EvalSettings(
        out_dir=tmp_path, mean=(0.3,), std=(0.3,), batch_size=32, linear_lrs=(0.01, 0.1), linear_epochs=3,
        linear_batch_size=16, seg_train_scenes=24, seg_test_scenes=8, seg_canvas=16, seg_epochs=2,
        seg_batch_size=8, n_pictures=3, progress=False, baseline_max_train=50, baseline_random_max_train=40,
    )  # fmt: skip
    backbone = tiny_backbone()
    metrics, files = evaluate_backbone(backbone, splits, cfg)
    contract = [
        "knn_top1",
        "knn_top1_k10",
        "knn_top1_k100",
        "knn_top1_k200",
        "linear_top1",
        "seg_miou",
    ]
    baselines = [
        f"baseline_{b}_{m}" for b in ("random", "pixels") for m in ("knn_top1", "linear_top1")
    ]
    label_free = ["rankme", "alignment", "uniformity", "view_retrieval_top1"]
    assert set(contract + baselines + label_free + ["baseline_random_seg_miou"]) <= set(metrics)
    # the reported kNN is the k = 20 protocol on the train bank, recomputed on its own here
    from dinoflow.evaluation.knn import backbone_knn

    details = json.loads(files["details"].read_text())
    precision = details["precision"]["precision"]  # auto: what this CPU measured (fp32 or bf16)
    assert precision in ("fp32", "bf16") and details["settings"]["precision"] == precision
    again = backbone_knn(backbone, splits["train"], splits["test"], (0.3,), (0.3,), None,
                         precision=precision)
    assert metrics["knn_top1"] == metrics["knn_top1_k20"] == again["top1_k20"]
    assert metrics["baseline_pixels_knn_top1"] > 0.9  # bright quadrant: trivially separable pixels
    for name in (
        "confusion_matrix",
        "segmentation",
        "pca_features",
        "pca_scenes",
        "pca_features_random",
    ):
        png_size(files[name])
    assert details["settings"]["linear_epochs"] == 3 and details["baseline_train_size"] == 50
    assert details["baseline_random_train_size"] == 40  # the random-init baseline's own cap
    assert details["linear"]["test_top1"] == metrics["linear_top1"]
    assert len(details["linear"]["val_accuracies"]) == 4 * 2
    assert set(details["timings_s"]) >= {
        "features",
        "knn_linear",
        "segmentation",
        "baseline_random",
    }


def test_random_init_like(tiny_backbone):
    torch.manual_seed(1)
    trained = tiny_backbone()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # "pretraining" moved every parameter
    a, b = random_init_like(trained, seed=3), random_init_like(trained, seed=3)
    for (name, p), q, t in zip(
        a.named_parameters(), b.parameters(), trained.parameters(), strict=True
    ):
        assert torch.equal(p, q), name  # the same seed gives the same weights
        if not name.startswith("norm"):
            assert not torch.equal(p, t), name  # and none of the trained ones
    made = random_init_like(trained, factory=lambda: tiny_backbone(dim=4))
    assert made.embed_dim == 4
    before = torch.random.get_rng_state()
    random_init_like(trained, seed=5)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is left alone
