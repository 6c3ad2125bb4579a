"""Teacher target construction: softmax centering (EMA center) and Sinkhorn-Knopp (docs/method.md section 4).

Both work on fp32 copies of the teacher logits and reduce over all processes when
torch.distributed is initialised, so every process sees the same center / the same global
Sinkhorn normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinoflow.distributed import is_distributed as dist_ready


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all_reduce (``op`` in {"sum", "max"}) when distributed, identity otherwise."""
    if dist_ready():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


class SoftmaxCentering(nn.Module):
    """DINO centering: ``softmax((t - center) / temp)`` with an EMA center over batch means.

    Call ``targets`` then ``update`` each step: the center used at step t therefore holds the
    batch means up to step t - 1 (the one-step lag of the reference implementation).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """(M, K) logits -> (M, K) probabilities, using the current center."""
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """center = m * center + (1 - m) * mean over all processes of the (M, K) logits.

        The mean is over every row of every process (global sum / global count). dinov2's
        iBOT center takes the mean of the per-process means instead, which differs when the
        processes hold unequal numbers of masked tokens. Decision (docs/faithfulness.md): keep
        the mean over all tokens, so N processes compute what one process computes on the same
        global batch (masks are drawn for the global batch, so per-rank counts do differ), and
        a process with no masked token contributes no NaN (the reference's mean of 0 rows).
        For the DINO (CLS) center both are the same: every process holds 2B rows.
        """
        logits = teacher_logits.float()
        batch_sum = all_reduce_(logits.sum(dim=0, keepdim=True))
        count = all_reduce_(torch.tensor([float(logits.shape[0])], device=logits.device))
        mean = batch_sum / count.clamp(min=1)
        updated = self.momentum * self.center + (1.0 - self.momentum) * mean
        # no token anywhere (e.g. nothing masked): keep the center; torch.where avoids a host sync
        self.center.copy_(torch.where(count > 0, updated, self.center))


def _global_logsumexp(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """log(sum(exp(x))) over ``dim`` (None: all elements), the sum taken over all processes.

    Subtracting the (global) max before exp keeps exp(t / 0.04) finite; the max is kept
    finite for empty inputs so an empty shard does not poison the reduction.
    """
    if dim is None:
        m = x.max() if x.numel() else torch.tensor(-math.inf, device=x.device)
        m = m.reshape(1)
    elif x.shape[dim]:
        m = x.amax(dim=dim)
    else:
        shape = list(x.shape)
        del shape[dim]
        m = torch.full(shape, -math.inf, device=x.device)
    m = all_reduce_(m.clone(), op="max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = x - (m if dim is None else m.unsqueeze(dim))
    s = torch.exp(shifted).sum() if dim is None else torch.exp(shifted).sum(dim=dim)
    s = all_reduce_(s.reshape(m.shape).clone())
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3
) -> torch.Tensor:
    """Sinkhorn-Knopp targets, (M, K) logits -> (M, K); each row sums to 1.

    Same steps as the reference (Q = exp(t/temp).T, Q /= sum(Q), then n times: rows /= row
    sums, /= K; columns /= column sums, /= M; finally Q *= M), done on log Q so that every
    normalisation subtracts its max before exp: with temp 0.04 the plain version overflows or
    leaves whole rows at 0. M and the row sums (over samples) are global over processes.
    """
    log_q = (teacher_logits.float() / temp).t()  # (K, M)
    n_protos = log_q.shape[0]
    m_global = all_reduce_(torch.tensor([float(log_q.shape[1])], device=log_q.device))
    log_m = torch.log(m_global)
    log_q = log_q - _global_logsumexp(log_q, dim=None)
    for _ in range(n_iterations):
        # each prototype gets total mass 1/K (sum over samples of all processes)
        log_q = log_q - _global_logsumexp(log_q, dim=1).unsqueeze(1) - math.log(n_protos)
        # each sample gets total mass 1/M (sum over prototypes, local)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_m
    return torch.exp(log_q + log_m).t()
