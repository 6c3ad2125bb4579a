"""Image embeddings for near-dedup, decontamination and clustering: (N, D) float32, L2-normalised.

Three embedders (``curation.embedding.kind``):
- ``pixels``: the RGB thumbnail (pixel_size^2 * 3 values) centred and projected on its first
  ``pca_dim`` principal components, PCA fitted on the pretraining pool only.
- ``dinoflow``: a dinoflow backbone (``save_backbone`` file, run directory or MLflow model URI
  such as ``models:/dinoflow-backbone@champion``, loaded by ``dinoflow.artifacts.load_model``):
  a trained teacher re-curates the data.
- ``timm``: any timm architecture with weights from a local file (nothing is downloaded).
Rows not embedded (dropped before this step) are zero vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinoflow.curation.config import EmbeddingConfig
from dinoflow.curation.rows import BLOCK_ROWS
from dinoflow.distributed import resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of x (N, D) scaled to unit norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


BLOCK = BLOCK_ROWS  # thumbnails read and projected at a time (8192 x 768 float64: 50 MB)


def pca_fit(
    x: np.ndarray, dim: int, max_fit: int = 100_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """PCA of x (N, D): (mean (D,), components (D, k)), k = min(dim, D, N), largest first."""
    fit = x[_fit_sample(len(x), max_fit, seed)]
    return pca_fit_blocks(lambda rows: fit[rows], len(fit), x.shape[1], dim)


def _fit_sample(n: int, max_fit: int, seed: int) -> np.ndarray:
    """The positions the PCA is fitted on: all n, or ``max_fit`` of them drawn with ``seed``."""
    if n <= max_fit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))


def pca_fit_blocks(
    read: Callable[[np.ndarray], np.ndarray], n: int, width: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """``pca_fit`` of the n rows ``read(rows)`` gives ((len(rows), width) float32), ``BLOCK``
    rows at a time: the memory is one block and the (width, width) covariance, whatever n."""
    blocks = [np.arange(s, min(n, s + BLOCK)) for s in range(0, n, BLOCK)]
    mean = sum(read(rows).sum(axis=0, dtype=np.float64) for rows in blocks) / max(n, 1)
    cov = np.zeros((width, width), dtype=np.float64)
    for rows in blocks:
        centred = (read(rows) - mean).astype(np.float32)  # float32 matmul: 4x faster, ample
        cov += centred.T @ centred
    eigvals, eigvecs = np.linalg.eigh(cov / max(n - 1, 1))
    k = min(dim, width, n)
    components = eigvecs[:, ::-1][:, :k]
    # A fixed sign per component (largest |loading| positive): the same data gives the same output.
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(k)])
    return mean, components * np.where(signs == 0, 1.0, signs)


def _width(thumbs: np.ndarray) -> int:
    return int(np.prod(thumbs.shape[1:]))


def _flat(thumbs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Thumbnails ``rows`` as (len(rows), s * s * 3) float32 in [0, 1]."""
    return thumbs[rows].reshape(len(rows), -1).astype(np.float32) / 255.0


def pixel_embeddings(
    thumbs: np.ndarray,
    fit_rows: np.ndarray,
    use_rows: np.ndarray,
    dim: int,
    max_fit: int,
    seed: int,
    progress: bool = False,
) -> np.ndarray:
    """Thumbnails (N, s, s, 3) uint8 -> (N, k) L2-normalised PCA embeddings; zeros off use_rows.
    ``progress``: a bar counting the images projected (the fit reads at most ``max_fit``).

    ``thumbs`` may be memory-mapped (the ingest's ``thumbnails.npy``): only the PCA's fit sample
    (at most ``max_fit`` rows, ``_fit_sample``) and the projection are read
    ``BLOCK`` rows at a time, as float32: never all N, nor the whole sample."""
    if not fit_rows.any():
        return np.zeros((len(thumbs), 1), dtype=np.float32)
    fit = np.flatnonzero(fit_rows)
    fit = fit[_fit_sample(len(fit), max_fit, seed)]  # only those rows are read
    mean, comps = pca_fit_blocks(
        lambda rows: _flat(thumbs, fit[rows]), len(fit), _width(thumbs), dim
    )
    from tqdm.auto import tqdm

    out = np.zeros((len(thumbs), comps.shape[1]), dtype=np.float32)
    idx = np.flatnonzero(use_rows)
    with tqdm(total=len(idx), desc="embed (pixels)", unit="img", disable=not progress) as bar:
        for start in range(0, len(idx), BLOCK):
            part = idx[start : start + BLOCK]
            out[part] = ((_flat(thumbs, part) - mean) @ comps).astype(np.float32)
            bar.update(len(part))
    return l2_normalise(out)


def thumbnail_mean_std(thumbs: np.ndarray, rows: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1]; std at least 1e-3) of the thumbnails ``rows``, read
    ``BLOCK`` at a time with exact integer sums; (0, 1e-3) when there is no row."""
    idx = np.flatnonzero(rows)
    if not len(idx):
        return [0.0] * 3, [1e-3] * 3
    total, squares = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for start in range(0, len(idx), BLOCK):
        x = thumbs[idx[start : start + BLOCK]].reshape(-1, 3).astype(np.int64)
        total += x.sum(0)
        squares += (x * x).sum(0)
    n = len(idx) * thumbs.shape[1] * thumbs.shape[2]
    mean = total / n
    var = np.maximum(squares / n - mean * mean, 0.0)
    return (mean / 255.0).tolist(), np.maximum(np.sqrt(var) / 255.0, 1e-3).tolist()


def load_model(cfg: EmbeddingConfig):
    """(module, in_chans, mean, std or None) for the dinoflow / timm embedders, in eval mode."""
    import torch

    if cfg.kind == "dinoflow":
        from dinoflow import artifacts

        key = "curation.embedding." + ("checkpoint" if cfg.checkpoint else "model_uri")
        model = artifacts.load_model(cfg.checkpoint or cfg.model_uri, key=key).backbone
        in_chans = int(model.in_chans)
        mean, std = cfg.mean, cfg.std
    elif cfg.kind == "timm":
        import timm

        model = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **cfg.timm_kwargs)
        state = torch.load(cfg.timm_weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"curation.embedding.timm_weights: {cfg.timm_weights} lacks {len(missing)} weights "
                f"of {cfg.timm_name} (first: {missing[0]})"
            )
        data_cfg = timm.data.resolve_model_data_config(model)
        in_chans = int(data_cfg["input_size"][0])
        mean = cfg.mean or list(data_cfg["mean"])
        std = cfg.std or list(data_cfg["std"])
    else:
        raise ValueError(f"curation.embedding.kind={cfg.kind!r} has no model")
    model.eval().to(resolve_device(cfg.device, "curation.embedding.device"))
    return model, in_chans, mean, std


def embedding_precision(cfg: EmbeddingConfig, model, device) -> tuple[str, str]:
    """(precision, why) of the embedder's forward: ``curation.embedding.precision``, or for auto
    training's rule (``dinoflow.precision``) for one MLP layer of a batch's shapes."""
    from dinoflow.precision import auto_precision

    if cfg.precision != "auto":
        return cfg.precision, f"curation.embedding.precision={cfg.precision}"
    dim = int(getattr(model, "embed_dim", None) or getattr(model, "num_features", 768))
    patch = getattr(model, "patch_size", None) or getattr(
        getattr(model, "patch_embed", None), "patch_size", 16
    )
    patch = int(patch[0] if isinstance(patch, tuple | list) else patch)
    tokens = (cfg.image_size // patch) ** 2 + 1
    return auto_precision(device, min(4096, cfg.batch_size * tokens), dim, 4 * dim)


@dataclass
class Embedder:
    """A loaded model embedder and how its inputs are prepared (``embedder``)."""

    model: Any
    in_chans: int
    mean: list[float]
    std: list[float]
    image_size: int
    batch_size: int
    device: Any
    precision: str


DatasetStats = Callable[[], tuple[list[float], list[float]]]  # () -> (mean, std) per channel


def embedder(cfg: EmbeddingConfig, dataset_stats: DatasetStats) -> Embedder:
    """The dinoflow / timm model of ``cfg`` on its device, with the normalisation it gets (the
    config's mean/std, else the model's own, else the dataset's: ``dataset_stats()``, called
    only then, since it reads every thumbnail) and the precision of its forward."""
    model, in_chans, mean, std = load_model(cfg)
    if mean is None or std is None:
        mean, std = dataset_stats()
    if in_chans == 1:
        mean, std = [float(np.mean(mean))], [float(np.mean(std))]
    device = next(model.parameters()).device
    precision, why = embedding_precision(cfg, model, device)
    logging.getLogger(__name__).info("curation embedding: %s", why)
    return Embedder(
        model,
        in_chans,
        [float(m) for m in mean[:in_chans]],
        [float(s) for s in std[:in_chans]],
        cfg.image_size,
        cfg.batch_size,
        device,
        precision,
    )


def embed_batches(
    emb: Embedder,
    load: Callable[[int], np.ndarray],
    rows: np.ndarray,
    bar: Any = None,
) -> np.ndarray | None:
    """(len(rows), D) float32 model features (not normalised) of ``rows``, ``batch_size`` at a
    time in the order given (the same rows give the same batches); None when rows is empty.
    ``bar``: a progress bar updated by the rows done."""
    import torch

    from dinoflow.data.transforms import preprocess
    from dinoflow.precision import autocast

    feats = []
    with torch.inference_mode(), autocast(emb.precision, emb.device):
        for start in range(0, len(rows), emb.batch_size):
            batch = rows[start : start + emb.batch_size]
            # the one normaliser (dinoflow.data.transforms), image by image: sizes differ
            x = torch.cat(
                [
                    preprocess(
                        torch.from_numpy(np.array(load(int(r)))).permute(2, 0, 1)[None],
                        emb.image_size,
                        emb.mean,
                        emb.std,
                        emb.in_chans,
                    )
                    for r in batch
                ]
            ).to(emb.device)
            feats.append(emb.model(x).float().cpu().numpy())
            if bar is not None:
                bar.update(len(batch))
    return np.concatenate(feats) if feats else None


def model_embeddings(
    cfg: EmbeddingConfig,
    load: Callable[[int], np.ndarray | None],
    rows: np.ndarray,
    n_total: int,
    dataset_stats: DatasetStats,
    progress: bool = True,
) -> np.ndarray:
    """(n_total, D) L2-normalised model embeddings of ``rows`` (others zero), in memory.

    load(row) -> (H, W, 3) uint8. Images go through ``dinoflow.data.transforms.preprocess`` (grey
    if the model takes one channel, the image_size centre crop at the default crop ratio as
    evaluation's, normalised as ``embedder`` says). The pipeline's step runs the same batches
    chunk by chunk on disk (``dinoflow.curation.embed_run``).
    """
    from tqdm.auto import tqdm

    emb = embedder(cfg, dataset_stats)
    with tqdm(total=len(rows), desc=f"embed ({cfg.kind})", disable=not progress) as bar:
        feats = embed_batches(emb, load, rows, bar)
    if feats is None:
        return np.zeros((n_total, 1), dtype=np.float32)
    out = np.zeros((n_total, feats.shape[1]), dtype=np.float32)
    out[rows] = feats
    return l2_normalise(out)
