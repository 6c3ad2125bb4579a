"""Losses against hand computations and naive python loops on tiny tensors (docs/method.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dinoflow.losses import (
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    SoftmaxCentering,
    masked_token_weights,
    sinkhorn_knopp,
)


def naive_log_softmax(row: list[float], temp: float) -> list[float]:
    z = [v / temp for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def naive_ce(target: list[float], student: list[float], temp: float) -> float:
    """-sum_k target_k * log softmax(student / temp)_k."""
    return -sum(t * lp for t, lp in zip(target, naive_log_softmax(student, temp), strict=True))


def naive_sinkhorn(logits: list[list[float]], temp: float, n_iter: int) -> list[list[float]]:
    """The reference procedure, element by element in float64 (no overflow protection)."""
    m, k = len(logits), len(logits[0])
    q = [[math.exp(logits[b][p] / temp) for b in range(m)] for p in range(k)]  # K x M
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iter):
        for p in range(k):
            s = sum(q[p])
            q[p] = [v / s / k for v in q[p]]
        for b in range(m):
            s = sum(q[p][b] for p in range(k))
            for p in range(k):
                q[p][b] = q[p][b] / s / m
    return [[q[p][b] * m for p in range(k)] for b in range(m)]


# ---------------------------------------------------------------- softmax centering


def test_softmax_centering_one_step_lag() -> None:
    torch.manual_seed(0)
    c = SoftmaxCentering(out_dim=5, momentum=0.9)
    t1, t2 = torch.randn(4, 5), torch.randn(3, 5)
    # step 1: zero center
    torch.testing.assert_close(c.targets(t1, 0.04), torch.softmax(t1 / 0.04, dim=-1))
    c.update(t1)
    center1 = 0.9 * 0.0 + 0.1 * t1.mean(0, keepdim=True)
    torch.testing.assert_close(c.center, center1)
    # step 2 uses the center built from step 1's batch only
    torch.testing.assert_close(c.targets(t2, 0.05), torch.softmax((t2 - center1) / 0.05, dim=-1))
    c.update(t2)
    torch.testing.assert_close(c.center, 0.9 * center1 + 0.1 * t2.mean(0, keepdim=True))


def test_softmax_centering_empty_batch_keeps_center() -> None:
    c = SoftmaxCentering(out_dim=3)
    c.update(torch.ones(2, 3))
    c.update(torch.zeros(0, 3))  # no masked token: must not become NaN
    torch.testing.assert_close(c.center, torch.full((1, 3), 0.1))


# ---------------------------------------------------------------- sinkhorn-knopp


def test_sinkhorn_matches_naive_loop() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    for n_iter in (1, 3):
        got = sinkhorn_knopp(logits, temp=0.1, n_iterations=n_iter)
        want = torch.tensor(naive_sinkhorn(logits.tolist(), 0.1, n_iter), dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # each sample's target is a distribution over the K prototypes
    torch.testing.assert_close(got.sum(-1), torch.ones(6))


def test_sinkhorn_fixed_point_balances_prototypes() -> None:
    torch.manual_seed(2)
    m, k = 12, 4
    q = sinkhorn_knopp(torch.randn(m, k), temp=0.5, n_iterations=200)
    torch.testing.assert_close(q.sum(-1), torch.ones(m))  # columns of Q: 1 per sample
    torch.testing.assert_close(q.sum(0), torch.full((k,), m / k))  # M/K mass per prototype


def test_sinkhorn_stable_at_low_temperature() -> None:
    torch.manual_seed(3)
    base = torch.randn(8, 6) * 0.2
    # exp((base + 50) / 0.04) = inf in fp32 and fp64: the naive loop cannot run on it,
    # but a constant shift must not change the result, so compare with the unshifted naive one
    shifted = base + 50.0
    got = sinkhorn_knopp(shifted, temp=0.04)
    unshifted = (shifted.double() - 50.0).tolist()  # exactly the fp32 input, minus 50
    want = torch.tensor(naive_sinkhorn(unshifted, 0.04, 3), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # logits of magnitude 50 and temp 0.04: most exp() underflow without the log-domain steps
    wild = sinkhorn_knopp(torch.randn(8, 6) * 50.0, temp=0.04)
    assert torch.isfinite(wild).all()
    torch.testing.assert_close(wild.sum(-1), torch.ones(8))
    assert sinkhorn_knopp(torch.randn(8, 6).half() * 50, temp=0.04).dtype == torch.float32


def test_distributed_code_path_world_size_one(tmp_path) -> None:
    """With one gloo process the all_reduce path must give the local results."""
    torch.manual_seed(4)
    t = torch.randn(5, 3)
    local_q = sinkhorn_knopp(t, 0.1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        c = SoftmaxCentering(3)
        c.update(t)
        torch.testing.assert_close(c.center, 0.1 * t.mean(0, keepdim=True))
        torch.testing.assert_close(sinkhorn_knopp(t, 0.1), local_q)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- DINO loss


def naive_dino(sg: torch.Tensor, sl: torch.Tensor, tg: torch.Tensor, same_view: bool) -> float:
    students = [*sg.tolist(), *sl.tolist()]
    pairs = [
        (v, j) for v in range(len(students)) for j in range(2) if same_view or v >= 2 or v != j
    ]
    b = sg.shape[1]
    total = sum(
        sum(naive_ce(tg[j][i].tolist(), students[v][i], 0.1) for i in range(b)) / b
        for v, j in pairs
    )
    return total / len(pairs)


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_matches_pairwise_loop(n_local: int) -> None:
    torch.manual_seed(5)
    b, k = 3, 7
    sg, sl = torch.randn(2, b, k), torch.randn(n_local, b, k)
    targets = torch.softmax(torch.randn(2, b, k) / 0.3, dim=-1)
    loss = DINOLoss(out_dim=k)(sg, sl, targets)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_dino(sg, sl, targets, same_view=False), rel=1e-5)


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_is_the_mean_over_2_plus_2n_pairs_by_hand(n_local: int) -> None:
    """One image, 2 prototypes, one-hot targets: global views with zero logits cost ln 2 per
    pair; local views with logits (0.1 ln 3, 0) (p = 3/4 after /0.1) cost -ln(3/4) per pair.
    The mean over the 2 + 2N pairs is then (2 ln 2 + 2N (-ln 0.75)) / (2 + 2N)."""
    targets = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    sg = torch.zeros(2, 1, 2)
    sl = torch.tensor([[[0.1 * math.log(3.0), 0.0]]]).repeat(n_local, 1, 1)
    loss = DINOLoss(out_dim=2, student_temp=0.1)(sg, sl, targets)
    expected = (2 * math.log(2) + 2 * n_local * -math.log(0.75)) / (2 + 2 * n_local)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_excludes_same_view_pair() -> None:
    k = 4
    # student view i predicts teacher view i perfectly, teacher view 1 - i very badly:
    # only the cross-view pairs may count, so the loss must be large
    t0, t1 = torch.eye(k)[0], torch.eye(k)[1]
    targets = torch.stack([t0, t1])[:, None, :]  # (2, 1, K)
    sg = torch.stack([t0 * 10, t1 * 10])[:, None, :]
    loss = DINOLoss(out_dim=k)(sg, torch.zeros(0, 1, k), targets)
    # by hand: CE of one-hot e1 against softmax(10*e0/0.1) = 100 + log(e^0*3 + e^100) - 0 ~ 100
    expected = -naive_log_softmax((t0 * 10).tolist(), 0.1)[1]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert naive_dino(sg, torch.zeros(0, 1, k), targets, same_view=True) < 0.6 * expected


def test_dino_teacher_targets_softmax_and_sinkhorn() -> None:
    torch.manual_seed(6)
    t = torch.randn(2, 3, 5)
    soft = DINOLoss(out_dim=5)
    out = soft.teacher_targets(t, 0.04)
    torch.testing.assert_close(out, torch.softmax(t / 0.04, dim=-1))  # first step: zero center
    torch.testing.assert_close(soft.centering.center, 0.1 * t.reshape(6, 5).mean(0, keepdim=True))
    sk = DINOLoss(out_dim=5, centering="sinkhorn_knopp")
    torch.testing.assert_close(
        sk.teacher_targets(t, 0.04), sinkhorn_knopp(t.reshape(6, 5), 0.04).reshape(2, 3, 5)
    )
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(out_dim=5, centering="mean")


def test_dino_loss_backprop_to_student_only() -> None:
    sg = torch.randn(2, 2, 4, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 2, 4), -1)
    DINOLoss(out_dim=4)(sg, torch.zeros(0, 2, 4), targets).backward()
    assert sg.grad is not None and torch.isfinite(sg.grad).all()


# ---------------------------------------------------------------- iBOT loss


def test_masked_token_weights() -> None:
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(
        masked_token_weights(masks), torch.tensor([0.5, 0.5, 1.0, 0.25, 0.25, 0.25, 0.25])
    )


def test_ibot_loss_by_hand() -> None:
    k = 6
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    w = masked_token_weights(masks)  # [1/2, 1/2, 1]
    targets = torch.eye(k)[:3]
    # uniform student: every token's CE is log K; (1/2 + 1/2 + 1) log K / 4 global crops
    loss = IBOTPatchLoss(out_dim=k)(torch.zeros(3, k), targets, w, n_global_crops=4)
    assert loss.item() == pytest.approx(0.5 * math.log(k), rel=1e-6)


def test_ibot_loss_matches_naive_loop() -> None:
    torch.manual_seed(7)
    k = 5
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    s, t = torch.randn(4, k), torch.softmax(torch.randn(4, k), -1)
    crop_of = [0, 0, 0, 2]
    n_in = [3, 0, 1]
    want = sum(naive_ce(t[m].tolist(), s[m].tolist(), 0.1) / n_in[crop_of[m]] for m in range(4)) / 3
    got = IBOTPatchLoss(out_dim=k)(s, t, masked_token_weights(masks), n_global_crops=3)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ibot_has_its_own_center_and_handles_no_masked_token() -> None:
    dino, ibot = DINOLoss(out_dim=3), IBOTPatchLoss(out_dim=3)
    dino.teacher_targets(torch.ones(2, 1, 3), 0.04)
    ibot.teacher_targets(torch.full((2, 3), 2.0), 0.04)
    torch.testing.assert_close(dino.centering.center, torch.full((1, 3), 0.1))
    torch.testing.assert_close(ibot.centering.center, torch.full((1, 3), 0.2))
    empty = torch.zeros(0, 3)
    loss = ibot(empty, ibot.teacher_targets(empty, 0.04), torch.zeros(0), n_global_crops=4)
    assert loss.item() == 0.0


# ---------------------------------------------------------------- KoLeo


def test_koleo_by_hand() -> None:
    # unit vectors at 0, 60 and 180 degrees (scaled: the loss normalises):
    # distances 1 (0-60), 2 (0-180), sqrt(3) (60-180); nearest: 0->60, 60->0, 180->60
    ang = torch.tensor([0.0, math.pi / 3, math.pi])
    x = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1) * torch.tensor([[1.0], [5.0], [0.5]])
    loss = KoLeoLoss()(x)
    assert loss.item() == pytest.approx(-(0.0 + 0.0 + math.log(math.sqrt(3))) / 3, abs=1e-6)


def test_koleo_duplicates_use_eps_and_exclude_diagonal() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    loss = KoLeoLoss(eps=1e-8)(x)
    assert loss.dtype == torch.float32
    want = -(2 * math.log(1e-8) + math.log(math.sqrt(2))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(torch.randn(1, 4))
