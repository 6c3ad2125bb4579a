"""Weighted kNN classification, the DINOv2 protocol (docs/method.md section 6).

Features are L2-normalised; similarity is the cosine; the top ``max(ks)`` neighbours of each test
row are found once; neighbour j votes for its class with weight exp(sim_j / temperature); class
scores are the sums of the votes of the first k neighbours, for every k.

Memory is bounded: test rows are processed ``test_chunk`` at a time and the train set is scanned
``train_chunk`` rows at a time with a running top-k merge, so the largest temporary is a
(test_chunk, train_chunk) similarity block whatever the size of the train set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from dinoflow.data.transforms import DEFAULT_CROP_RATIO


def _top_neighbours(
    queries: torch.Tensor, train: torch.Tensor, k: int, train_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of normalised ``queries`` (m, D) against ``train`` (N, D).

    Returns (sims (m, k) descending, indices (m, k) into train).
    """
    best_s = queries.new_empty((queries.shape[0], 0))
    best_i = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, train.shape[0], train_chunk):
        block = train[start : start + train_chunk]
        sims = queries @ block.T
        s, i = sims.topk(min(k, sims.shape[1]), dim=1)
        merged_s = torch.cat([best_s, s], dim=1)
        merged_i = torch.cat([best_i, i + start], dim=1)
        best_s, pos = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
        best_i = merged_i.gather(1, pos)
    return best_s, best_i


def _iter_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    n_classes: int,
    ks: Sequence[int],
    temperature: float,
    test_chunk: int,
    train_chunk: int,
    device: str | torch.device,
) -> Iterator[tuple[int, int, dict[int, torch.Tensor]]]:
    """Yield (start, stop, {k: class scores (stop - start, n_classes)}) per test chunk."""
    keep = train_labels >= 0  # unlabelled train rows cannot vote
    if not bool(keep.all()):
        train_feats, train_labels = train_feats[keep], train_labels[keep]
    # one normalised copy of the train set (the only full-size temporary)
    train = F.normalize(train_feats.to(device=device, dtype=torch.float32), dim=1)
    labels = train_labels.to(device)
    if train.shape[0] == 0:
        raise ValueError("kNN: the train set has no labelled rows")
    max_k = min(max(ks), train.shape[0])
    for start in range(0, test_feats.shape[0], test_chunk):
        stop = min(start + test_chunk, test_feats.shape[0])
        queries = F.normalize(test_feats[start:stop].float(), dim=1).to(device)
        sims, idx = _top_neighbours(queries, train, max_k, train_chunk)
        votes = torch.exp(sims / temperature)
        neighbour_labels = labels[idx]
        scores = {}
        for k in ks:
            kk = min(k, max_k)
            scores[k] = torch.zeros(stop - start, n_classes, device=device).scatter_add_(
                1, neighbour_labels[:, :kk], votes[:, :kk]
            )
        yield start, stop, scores


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    n_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    test_chunk: int = 256,
    train_chunk: int = 65536,
    device: str | torch.device = "cpu",
) -> dict[int, torch.Tensor]:
    """Class scores {k: (M, n_classes)} for every test row (train_feats (N, D), test_feats (M, D)).

    Keeps all scores in memory (M * n_classes per k); ``knn_classify`` does not.
    """
    out = {k: torch.empty(test_feats.shape[0], n_classes) for k in ks}
    for start, stop, scores in _iter_scores(
        train_feats,
        train_labels,
        test_feats,
        n_classes,
        ks,
        temperature,
        test_chunk,
        train_chunk,
        device,
    ):
        for k in ks:
            out[k][start:stop] = scores[k].cpu()
    return out


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    test_chunk: int = 256,
    train_chunk: int = 65536,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of weighted kNN for each k: {"top1_k20": ..., "top5_k20": ...}.

    Shapes: train_feats (N, D), train_labels (N,), test_feats (M, D), test_labels (M,).
    Rows labelled -1 are ignored (train: they do not vote; test: not counted). Top-5 is top-min(5,
    n_classes). Top-1 ties in the class scores go to the lowest class index.
    """
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    ks = tuple(int(k) for k in ks)
    top1 = dict.fromkeys(ks, 0)
    top5 = dict.fromkeys(ks, 0)
    n_top = min(5, n_classes)
    for start, stop, scores in _iter_scores(
        train_feats,
        torch.as_tensor(train_labels, dtype=torch.long),
        test_feats,
        n_classes,
        ks,
        temperature,
        test_chunk,
        train_chunk,
        device,
    ):
        target = test_labels[start:stop].to(device)
        valid = target >= 0
        for k in ks:
            # argmax: ties go to the lowest class index, deterministically
            top1[k] += int(((scores[k].argmax(dim=1) == target) & valid).sum())
            best = scores[k].topk(n_top, dim=1).indices
            top5[k] += int(((best == target[:, None]).any(dim=1) & valid).sum())
    n_valid = int((test_labels >= 0).sum())
    if n_valid == 0:
        raise ValueError("kNN: the test set has no labelled rows")
    metrics = {}
    for k in ks:
        metrics[f"top1_k{k}"] = top1[k] / n_valid
        metrics[f"top5_k{k}"] = top5[k] / n_valid
    return metrics


@torch.inference_mode()
def backbone_knn(
    backbone: torch.nn.Module,
    bank,
    queries,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None,
    device: str | torch.device = "cpu",
    ks: Sequence[int] = (20,),
    batch_size: int = 256,
    features: str = "cls",
    precision: str = "fp32",
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> dict[str, float]:
    """kNN (DINOv2 weighting) of a backbone: a labelled bank split against a labelled query
    split (anything with ``len``, ``load(i)`` and ``labels``) -> ``knn_classify``'s
    {"top1_k20": ..., "top5_k20": ...}. ``features``: "cls" (the DINOv2 protocol) or
    "cls+patch_mean" (the CLS concatenated with the mean patch token, for information).
    ``precision``: the backbone's forward, "fp32" or "bf16" autocast (``extract_features``).
    Images: the ``image_size`` centre crop at ``crop_ratio`` (``resize_center_crop``)."""
    from dinoflow.evaluation.features import extract_features

    if features not in ("cls", "cls+patch_mean"):
        raise ValueError(f"features must be 'cls' or 'cls+patch_mean', got {features!r}")
    was_training = backbone.training
    backbone.eval()
    try:
        feats = [
            extract_features(
                backbone,
                s,
                image_size,
                mean,
                std,
                batch_size=batch_size,
                n_last_blocks=1,
                device=str(device),
                progress=False,
                precision=precision,
                crop_ratio=crop_ratio,
            )
            for s in (bank, queries)
        ]
    finally:
        backbone.train(was_training)
    x = [
        f.cls_last if features == "cls" else torch.cat([f.cls_last, f.patch_mean], dim=1)
        for f in feats
    ]
    return _split_knn(x[0], x[1], bank, queries, ks)


def _split_knn(
    bank_x: torch.Tensor, query_x: torch.Tensor, bank, queries, ks: Sequence[int]
) -> dict[str, float]:
    """``knn_classify`` of features of a bank split and a query split, with their labels."""
    bank_labels, query_labels = torch.as_tensor(bank.labels), torch.as_tensor(queries.labels)
    n_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return knn_classify(bank_x, bank_labels, query_x, query_labels, n_classes, ks=tuple(ks))


def pixels_knn(
    bank,
    queries,
    image_size: int | None,
    ks: Sequence[int] = (20,),
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> dict[str, float]:
    """``backbone_knn``'s protocol on raw pixels (each image's centre crop, flattened): the
    reference a learned feature has to beat on the same bank and queries."""
    from dinoflow.evaluation.features import raw_pixel_features

    x = [raw_pixel_features(s, image_size, crop_ratio=crop_ratio).cls_last for s in (bank, queries)]
    return _split_knn(x[0], x[1], bank, queries, ks)
