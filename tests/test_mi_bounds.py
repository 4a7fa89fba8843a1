"""MI bounds on critic scores: closed-form golden values and hand-derived gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mimkd.errors import MethodError
from mimkd.mi import crd_nce_loss, dv_bound, infonce_bound, infonce_loss, jsd_bound, jsd_loss
from mimkd.mi.bounds import LOG4


def close(x: torch.Tensor, value: float, tol: float = 1e-6) -> bool:
    return abs(float(x.detach()) - value) <= tol


# ------------------------------------------------------------------------------------------------------ JSD
def test_jsd_all_zero_scores():
    pos, neg = torch.zeros(8, 1, 4, 4), torch.zeros(8, 1, 4, 4)
    assert close(jsd_bound(pos, neg), -1.3862944)
    assert close(jsd_loss(pos, neg), 1.3862944)
    assert close(jsd_bound(pos, neg, shift=True), 0.0)
    assert close(jsd_loss(pos, neg, shift=True), 0.0)


@pytest.mark.parametrize(("c", "expected"), [(1.0, -1.6265234), (2.0, -2.2538560)])
def test_jsd_constant_score(c, expected):
    pos, neg = torch.full((5,), c), torch.full((7,), c)
    assert close(jsd_bound(pos, neg), expected)
    assert close(jsd_bound(pos, neg, shift=True), expected + math.log(4))


@pytest.mark.parametrize(
    ("a", "expected", "tol"), [(2.0, -0.2538560, 1e-6), (5.0, -0.0134307, 1e-6), (10.0, -9.0798e-5, 1e-8)]
)
def test_jsd_separated_scores(a, expected, tol):
    pos, neg = torch.full((16,), a), torch.full((16,), -a)
    assert close(jsd_bound(pos, neg), expected, tol)


def test_jsd_identical_pos_and_neg_scores_never_beat_minus_log4():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randn(64, generator=g) * 3 + torch.randn(1, generator=g)
        assert float(jsd_bound(scores, scores)) <= -LOG4 + 1e-6


def test_jsd_each_expectation_averaged_separately():
    # different sizes for positives and negatives (DIM all-pairs layout): each term is its own mean
    pos = torch.tensor([1.0, -2.0])
    neg = torch.tensor([[0.5, -1.0, 3.0], [0.0, 2.0, -0.5]])
    expected = -F.softplus(-pos).mean() - F.softplus(neg).mean()
    assert torch.allclose(jsd_bound(pos, neg), expected)
    bce = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )
    assert torch.allclose(jsd_loss(pos, neg), bce)


def test_jsd_loss_gradient():
    pos = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    neg = torch.tensor([1.5, -0.7], requires_grad=True)
    jsd_loss(pos, neg).backward()
    assert torch.allclose(pos.grad, -torch.sigmoid(-pos.detach()) / 3)
    assert torch.allclose(neg.grad, torch.sigmoid(neg.detach()) / 2)
    # the shift changes the value only
    p2, n2 = pos.detach().clone().requires_grad_(), neg.detach().clone().requires_grad_()
    jsd_loss(p2, n2, shift=True).backward()
    assert torch.allclose(p2.grad, pos.grad) and torch.allclose(n2.grad, neg.grad)


# -------------------------------------------------------------------------------------------------- infoNCE
@pytest.mark.parametrize("k", [1, 7, 4096])
def test_infonce_equal_logits(k):
    pos, neg = torch.full((3,), 0.7), torch.full((3, k), 0.7)
    assert close(infonce_loss(pos, neg), math.log(k + 1), 1e-5)
    assert close(infonce_bound(pos, neg), 0.0, 1e-5)


@pytest.mark.parametrize(("k", "ceiling"), [(1, 0.6931472), (4096, 8.3180103), (16384, 9.7041216)])
def test_infonce_ceiling(k, ceiling):
    neg = torch.zeros(2, k, dtype=torch.float64)
    assert close(infonce_bound(torch.full((2,), 60.0, dtype=torch.float64), neg), ceiling, 1e-6)
    # bounded by the ceiling, approached as the positive grows
    values = [float(infonce_bound(torch.full((2,), p, dtype=torch.float64), neg)) for p in (0.0, 5.0, 20.0)]
    assert values == sorted(values) and all(v <= ceiling + 1e-7 for v in values)


def test_infonce_loss_is_ceiling_minus_bound_and_cross_entropy():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(6, generator=g), torch.randn(6, 9, generator=g)
    assert torch.allclose(infonce_loss(pos, neg), math.log(10) - infonce_bound(pos, neg), atol=1e-6)
    logits = torch.cat([pos[:, None], neg], 1)
    assert torch.allclose(infonce_loss(pos, neg), F.cross_entropy(logits, torch.zeros(6, dtype=torch.long)))


def test_infonce_loss_gradient():
    pos = torch.tensor([0.5, -1.0], requires_grad=True)
    neg = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.3, 0.0]], requires_grad=True)
    infonce_loss(pos, neg).backward()
    p = torch.softmax(torch.cat([pos.detach()[:, None], neg.detach()], 1), dim=1)
    assert torch.allclose(pos.grad, (p[:, 0] - 1) / 2)
    assert torch.allclose(neg.grad, p[:, 1:] / 2)


# ------------------------------------------------------------------------------------------------------- DV
def test_dv_bound_hand_value_and_gradient():
    pos = torch.tensor([1.0, 3.0], requires_grad=True)
    neg = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    # mean(pos) = 2; log mean exp(neg) = log((1 + 3) / 2) = log 2
    value = dv_bound(pos, neg)
    assert close(value, 2.0 - math.log(2.0))
    value.backward()
    assert torch.allclose(pos.grad, torch.tensor([0.5, 0.5]))
    assert torch.allclose(neg.grad, -torch.tensor([[0.25, 0.75]]))


# -------------------------------------------------------------------------------------------------- CRD-NCE
@pytest.mark.parametrize(
    ("k", "eps", "expected"),
    [(4096, 0.0, 9.3178882), (16384, 0.0, 10.7040910), (4096, 1e-7, 9.3228882), (16384, 1e-7, 10.7090910)],
)
def test_crd_nce_uniform_scores(k, eps, expected):
    n = 50_000
    pos = torch.full((4,), 1.0 / n, dtype=torch.float64)
    neg = torch.full((4, k), 1.0 / n, dtype=torch.float64)
    assert close(crd_nce_loss(pos, neg, n, eps=eps), expected, 1e-4)


def test_crd_nce_default_eps_and_float32():
    n, k = 50_000, 4096
    loss = crd_nce_loss(torch.full((2,), 1.0 / n), torch.full((2, k), 1.0 / n), n)
    assert close(loss, 9.3228882, 1e-3)


def test_crd_nce_gradient():
    n, k, eps = 100, 2, 1e-7
    c = k / n
    pos = torch.tensor([0.2, 0.05], dtype=torch.float64, requires_grad=True)
    neg = torch.tensor([[0.01, 0.3], [0.02, 0.0]], dtype=torch.float64, requires_grad=True)
    crd_nce_loss(pos, neg, n, eps=eps).backward()
    p, q = pos.detach(), neg.detach()
    # d/dP0 of -log(P0/(P0+c+eps)) = -(1/P0 - 1/(P0+c+eps)); d/dPk of -log(c/(Pk+c+eps)) = 1/(Pk+c+eps); / B
    assert torch.allclose(pos.grad, -(1 / p - 1 / (p + c + eps)) / 2)
    assert torch.allclose(neg.grad, 1 / (q + c + eps) / 2)


# ------------------------------------------------------------------------------------------------ validation
def test_shape_validation():
    with pytest.raises(MethodError, match="shape"):
        infonce_bound(torch.zeros(4), torch.zeros(3, 5))
    with pytest.raises(MethodError, match="shape"):
        infonce_loss(torch.zeros(4, 1), torch.zeros(4, 5))
    with pytest.raises(MethodError, match="shape"):
        crd_nce_loss(torch.zeros(4), torch.zeros(4), 10)
    with pytest.raises(MethodError, match="n_data"):
        crd_nce_loss(torch.zeros(4), torch.zeros(4, 2), 0)
    with pytest.raises(MethodError, match="empty"):
        jsd_bound(torch.zeros(0), torch.zeros(3))
    with pytest.raises(MethodError, match="floating"):
        dv_bound(torch.zeros(3, dtype=torch.long), torch.zeros(3))
