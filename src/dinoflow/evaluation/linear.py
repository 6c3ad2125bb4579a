"""Linear probe on frozen, cached features (docs/method.md section 6).

Candidates = feature variants (last 1 or 4 blocks' CLS, each with or without the average-pooled
patch tokens of the last block) x a learning-rate grid. All candidates train together: one pass per
epoch over the cached train features, every head sees the same batches. SGD momentum 0.9, no
weight decay, cosine schedule to 0 over all iterations, heads initialised N(0, 0.01), bias 0 (as
the reference). The learning rates are given for batch 256 and scaled by batch_size / 256 (as the
reference scales by the global batch).

The best candidate is chosen on the validation split; only then is the test split read, once, for
the chosen candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The reference grid (dinov2/eval/linear.py).
DEFAULT_LRS: tuple[float, ...] = (
    1e-5,
    2e-5,
    5e-5,
    1e-4,
    2e-4,
    5e-4,
    1e-3,
    2e-3,
    5e-3,
    1e-2,
    2e-2,
    5e-2,
    1e-1,
)

# Candidate feature variants: the FeatureSet fields concatenated, in order.
VARIANTS: dict[str, tuple[str, ...]] = {
    "blocks1_cls": ("cls_last",),
    "blocks1_cls_avgpool": ("cls_last", "patch_mean"),
    "blocks4_cls": ("cls_last4",),
    "blocks4_cls_avgpool": ("cls_last4", "patch_mean"),
}


def available_variants(features: Any) -> list[str]:
    """The variants whose fields are all present (raw pixels: only "blocks1_cls")."""
    return [
        name
        for name, fields in VARIANTS.items()
        if all(getattr(features, f) is not None for f in fields)
    ]


def variant_features(features: Any, variant: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(len(rows), D_variant) float32: the fields of ``variant`` for ``rows`` (all if None)."""
    parts = []
    for field in VARIANTS[variant]:
        x = getattr(features, field)
        parts.append((x if rows is None else x[rows]).float())
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def candidate_name(variant: str, lr: float) -> str:
    return f"{variant}_lr{lr:g}"


class _VariantHeads(nn.Module):
    """The linear heads of one variant, one per learning rate, evaluated in one matmul."""

    def __init__(self, in_dim: int, n_classes: int, n_heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, n_classes) for _ in range(n_heads))
        for head in self.heads:
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> logits (B, n_heads, n_classes)."""
        weight = torch.cat([h.weight for h in self.heads])  # (n_heads * C, D)
        bias = torch.cat([h.bias for h in self.heads])
        return F.linear(x, weight, bias).view(x.shape[0], len(self.heads), -1)


def _labelled_rows(labels: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(torch.as_tensor(labels) >= 0).flatten()


@torch.no_grad()
def _predict(
    heads: _VariantHeads, features: Any, variant: str, rows: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Predicted classes (len(rows), n_heads) of every head of one variant."""
    preds = []
    for start in range(0, len(rows), batch_size):
        x = variant_features(features, variant, rows[start : start + batch_size])
        preds.append(heads(x).argmax(dim=-1))
    return torch.cat(preds)


def linear_probe(
    train: Any,
    val: Any,
    test: Any,
    n_classes: int | None = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 10,
    batch_size: int = 256,
    variants: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every (variant, lr) head on ``train``, pick the best on ``val``, evaluate it on ``test``.

    train/val/test: FeatureSet-like objects (fields cls_last, cls_last4, patch_mean, labels).
    Rows labelled -1 are ignored. ``test`` is not read at all before the choice is made.

    Returns {"best": name, "best_variant", "best_lr", "val_top1", "linear_top1" (test accuracy),
    "val_accuracies": {name: acc}, "test_predictions" (M,) int64 ndarray and "test_labels" (M,)
    for the labelled test rows, "head": the chosen nn.Linear}.
    """
    if epochs < 1:
        raise ValueError(f"linear probe: epochs must be >= 1, got {epochs}")
    variants = list(variants) if variants is not None else available_variants(train)
    if not variants:
        raise ValueError("linear probe: no feature variant is available")
    train_labels = torch.as_tensor(train.labels, dtype=torch.long)
    val_labels = torch.as_tensor(val.labels, dtype=torch.long)
    train_rows, val_rows = _labelled_rows(train_labels), _labelled_rows(val_labels)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError("linear probe: train and val need labelled rows")
    if n_classes is None:
        n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    lrs = [float(lr) for lr in lrs]

    heads = _init_heads(train, train_rows[:1], variants, n_classes, len(lrs), seed)
    _train_heads(heads, train, train_labels, train_rows, lrs, epochs, batch_size, seed, progress)
    val_acc, best, best_variant, best_index = _select_on_val(heads, val, val_labels, val_rows, lrs)
    head = heads[best_variant].heads[best_index]
    # The test split is read here for the first time, for the chosen head only.
    test_pred, test_target = _predict_test(head, test, best_variant)
    return {
        "best": best,
        "best_variant": best_variant,
        "best_lr": lrs[best_index],
        "val_top1": val_acc[best],
        "linear_top1": float((test_pred == test_target).float().mean()),
        "val_accuracies": val_acc,
        "test_predictions": test_pred.numpy().astype(np.int64),
        "test_labels": test_target.numpy().astype(np.int64),
        "head": head,
    }


def _init_heads(
    train: Any,
    one_row: torch.Tensor,
    variants: Sequence[str],
    n_classes: int,
    n_lrs: int,
    seed: int,
) -> nn.ModuleDict:
    """{variant: _VariantHeads}, one head per learning rate, seeded (the caller's RNG untouched)."""
    heads = nn.ModuleDict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for variant in variants:
            dim = variant_features(train, variant, one_row).shape[1]
            heads[variant] = _VariantHeads(dim, n_classes, n_lrs)
    return heads


def _train_heads(
    heads: nn.ModuleDict,
    train: Any,
    train_labels: torch.Tensor,
    train_rows: torch.Tensor,
    lrs: list[float],
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool,
) -> None:
    """All heads together: SGD momentum 0.9, lr * batch_size / 256, cosine to 0, same batches."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    variants = list(heads)
    groups = []
    for variant in variants:
        for head, lr in zip(heads[variant].heads, lrs, strict=True):
            groups.append({"params": list(head.parameters()), "lr": lr * batch_size / 256})
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    heads.train()
    for _ in tqdm(
        range(epochs), desc="linear probe", unit="epoch", disable=not progress, leave=False
    ):
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            target = train_labels[rows]
            loss = torch.zeros(())
            for variant in variants:
                logits = heads[variant](variant_features(train, variant, rows))  # (B, H, C)
                # sum over heads of each head's mean CE: heads have disjoint parameters
                loss = loss + F.cross_entropy(
                    logits.permute(0, 2, 1), target[:, None].expand(-1, len(lrs)), reduction="sum"
                ) / len(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def _select_on_val(
    heads: nn.ModuleDict,
    val: Any,
    val_labels: torch.Tensor,
    val_rows: torch.Tensor,
    lrs: list[float],
) -> tuple[dict[str, float], str, str, int]:
    """(val accuracy of every candidate, best name, its variant, its lr index), on val only.

    Ties: the first of equals, in variant order then lr order."""
    heads.eval()
    val_target = val_labels[val_rows]
    val_acc: dict[str, float] = {}
    where: dict[str, tuple[str, int]] = {}
    for variant in heads:
        preds = _predict(heads[variant], val, variant, val_rows, 4096)
        accs = (preds == val_target[:, None]).float().mean(dim=0)
        for i, (lr, acc) in enumerate(zip(lrs, accs.tolist(), strict=True)):
            val_acc[candidate_name(variant, lr)] = acc
            where[candidate_name(variant, lr)] = (variant, i)
    best = max(val_acc, key=val_acc.__getitem__)
    return val_acc, best, *where[best]


@torch.no_grad()
def _predict_test(head: nn.Linear, test: Any, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, labels) of the labelled test rows, for the chosen head."""
    test_labels = torch.as_tensor(test.labels, dtype=torch.long)
    test_rows = _labelled_rows(test_labels)
    if len(test_rows) == 0:
        raise ValueError("linear probe: the test set has no labelled rows")
    test_pred = torch.cat(
        [
            head(variant_features(test, variant, test_rows[s : s + 4096])).argmax(dim=1)
            for s in range(0, len(test_rows), 4096)
        ]
    )
    return test_pred, test_labels[test_rows]
