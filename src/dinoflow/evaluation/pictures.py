"""Evaluation pictures, written as PNG files (matplotlib ``Figure`` objects on the Agg canvas;
pyplot and the global backend are left alone, so this works headless and inside notebooks).

- ``pca_feature_maps``: the DINOv2 figure: the first 3 principal components of the patch features,
  computed jointly over a few images, shown as RGB maps next to the inputs; optionally the
  background is removed by thresholding the first component and the PCA is redone on the
  foreground patches only.
- ``confusion_matrix_figure``: row-normalised confusion matrix of a classifier.
- ``segmentation_figure``: images, ground-truth masks and predicted masks, one column per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinoflow.data.transforms import DEFAULT_CROP_RATIO, resize_center_crop


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """A pyplot-free figure and its (nrows, ncols) axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", format="png")
    return path


def _pca(x: torch.Tensor, n_components: int) -> torch.Tensor:
    """Projections (M, n_components) of rows x (M, D) on their top principal directions."""
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:n_components].T


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each column to [0, 1]."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def pca_rgb(
    patch_tokens: torch.Tensor, foreground_threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens (n, h, w, D) -> (RGB maps (n, h, w, 3) in [0, 1], foreground (n, h, w) bool).

    With ``foreground_threshold``, the first component (scaled to [0, 1] and oriented so that the
    border patches, mostly background, are low) separates foreground; the 3-component PCA is then
    fitted on foreground patches only and background is black.
    """
    n, h, w, d = patch_tokens.shape
    flat = patch_tokens.reshape(-1, d).double()
    foreground = torch.ones(n * h * w, dtype=torch.bool)
    if foreground_threshold is not None:
        first = _minmax(_pca(flat, 1))[:, 0].view(n, h, w)
        border = torch.zeros(h, w, dtype=torch.bool)
        border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
        if first[:, border].mean() > first.mean():
            first = 1.0 - first
        foreground = (first > foreground_threshold).flatten()
        if int(foreground.sum()) < 3:  # too few patches for a PCA: keep everything
            foreground[:] = True
    rgb = torch.zeros(n * h * w, 3, dtype=torch.float64)
    components = _pca(flat[foreground], 3)
    if components.shape[1] < 3:  # fewer feature dims or rows than 3 components
        components = torch.nn.functional.pad(components, (0, 3 - components.shape[1]))
    rgb[foreground] = _minmax(components)
    return rgb.view(n, h, w, 3).float(), foreground.view(n, h, w)


def _display(images: np.ndarray) -> tuple[np.ndarray, str | None]:
    """uint8 (n, H, W[, C]) -> array for imshow and its colormap."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    return images, ("gray" if images.ndim == 3 else None)


def _centre_crops(images: np.ndarray, size: int, crop_ratio: float) -> np.ndarray:
    """uint8 (n, H, W[, C]) -> (n, size, size[, C]): each image's ``resize_center_crop``."""
    images = np.asarray(images)
    x = torch.as_tensor(images)
    x = x.unsqueeze(1) if images.ndim == 3 else x.permute(0, 3, 1, 2)
    out = resize_center_crop(x, size, crop_ratio).permute(0, 2, 3, 1).numpy()
    return out[..., 0] if images.ndim == 3 else out


def pca_feature_maps(
    backbone: nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    path: str | Path,
    image_size: int | None = None,
    foreground_threshold: float | None = None,
    title: str | None = None,
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> Path:
    """Write the DINOv2 PCA figure for uint8 ``images`` (n, H, W[, C]): inputs on the top row,
    PCA-of-patch-features RGB maps below. Returns the PNG path. With ``image_size`` both rows are
    the ``image_size`` centre crop at ``crop_ratio`` (``resize_center_crop``): what kNN sees."""
    from dinoflow.evaluation.segmentation import extract_patch_maps

    if image_size is not None:
        images = _centre_crops(images, image_size, crop_ratio)

    maps = extract_patch_maps(
        backbone, images, mean, std, image_size, progress=False
    )  # (n, D, h, w)
    rgb, _ = pca_rgb(maps.permute(0, 2, 3, 1), foreground_threshold)
    shown, cmap = _display(np.asarray(images))
    n = len(shown)
    fig, axes = new_figure(2, n, (1.6 * n, 3.4))
    for i in range(n):
        axes[0, i].imshow(shown[i], cmap=cmap)
        axes[1, i].imshow(rgb[i].numpy(), interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_axis_off()
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("PCA of patch features", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def classification_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def confusion_matrix_figure(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "linear probe, test",
) -> Path:
    """Write the row-normalised confusion matrix (counts annotated as fractions). Returns the path."""
    n = len(class_names)
    counts = classification_confusion(y_true, y_pred, n)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, axes = new_figure(1, 1, (0.55 * n + 2.5, 0.55 * n + 2))
    ax = axes[0, 0]
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(
                    j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour
                )
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title} (accuracy {accuracy:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def label_colours(n_classes: int) -> np.ndarray:
    """(n_classes + 1, 3) float RGB: class 0 (background) black, then tab20 colours; the last row
    (index n_classes) is white, for ignored pixels."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    colours = np.zeros((n_classes + 1, 3))
    for c in range(1, n_classes):
        colours[c] = cmap((c - 1) % 20)[:3]
    colours[n_classes] = 1.0
    return colours


def colourise(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """Class map (H, W) -> RGB (H, W, 3); out-of-range values (ignore) in white."""
    mask = np.asarray(mask, dtype=np.int64)
    return label_colours(n_classes)[np.where((mask >= 0) & (mask < n_classes), mask, n_classes)]


def segmentation_figure(
    images: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    path: str | Path,
    n_classes: int | None = None,
    title: str | None = None,
) -> Path:
    """Write images (n, H, W[, C]) uint8, ground truth and predicted masks (n, H, W) in three rows.
    Returns the PNG path."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if n_classes is None:
        valid = gt[gt != 255]
        n_classes = int(max(valid.max(initial=0), pred.max(initial=0))) + 1
    shown, cmap = _display(np.asarray(images))
    n = len(shown)
    fig, axes = new_figure(3, n, (1.6 * n, 5.0))
    for i in range(n):
        axes[0, i].imshow(shown[i], cmap=cmap)
        axes[1, i].imshow(colourise(gt[i], n_classes), interpolation="nearest")
        axes[2, i].imshow(colourise(pred[i], n_classes), interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_axis_off()
    for row, name in enumerate(("image", "ground truth", "prediction")):
        axes[row, 0].set_title(name, fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
