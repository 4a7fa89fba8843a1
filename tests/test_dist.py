"""DIST (Huang et al., NeurIPS 2022): golden values by hand, invariances, gradients, real steps, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mimkd
from mimkd.distillers.dist import (
    DISTOptions,
    dist_loss,
    dist_terms,
    inter_class_relation,
    intra_class_relation,
)
from mimkd.engine.step import TrainStep
from mimkd.errors import ConfigError
from mimkd.models import build_network

EPS = 1e-8  # the reference Pearson's epsilon, added to the product of the centred norms

# 3 samples × 4 classes
S = [[2.0, 1.0, 0.0, -1.0], [0.5, -0.5, 1.5, 0.0], [-1.0, 2.0, 0.5, 1.0]]
T = [[3.0, 0.0, 0.5, -2.0], [0.0, 1.0, 2.0, -1.0], [-0.5, 1.5, 1.0, 2.5]]


# ------------------------------------------------------------------ an independent reference, in numpy
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_pearson(u: np.ndarray, v: np.ndarray) -> float:
    du, dv = u - u.mean(), v - v.mean()
    return float((du * dv).sum() / (np.sqrt((du**2).sum()) * np.sqrt((dv**2).sum()) + EPS))


def np_dist(s, t, tau: float) -> tuple[float, float]:
    """``(τ²·inter, τ²·intra)``, one sample and one class at a time."""
    ps, pt = np_softmax(np.asarray(s) / tau), np_softmax(np.asarray(t) / tau)
    b, c = ps.shape
    inter = np.mean([1.0 - np_pearson(ps[i], pt[i]) for i in range(b)])
    intra = np.mean([1.0 - np_pearson(ps[:, j], pt[:, j]) for j in range(c)])
    return tau * tau * float(inter), tau * tau * float(intra)


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ golden values
def test_two_classes_by_hand():
    """With 2 classes (and 2 samples) every Pearson correlation is ±1: the loss can be read off the table.

    Student rows (0.7, 0.3), (0.4, 0.6); teacher rows (0.8, 0.2), (0.6, 0.4). Per sample: both prefer class 0
    in row 1 (ρ = +1), they disagree in row 2 (ρ = −1): inter = 1 − 0 = 1. Per class, across the batch: class
    0 falls in both (+1), class 1 rises in both (+1): intra = 1 − 1 = 0. At τ = 2 both are multiplied by 4.
    The epsilon moves each |ρ| below 1 by about ε/(‖ū‖·‖v̄‖) ≤ 1e-6 here.
    """
    p_s, p_t = f64([[0.7, 0.3], [0.4, 0.6]]), f64([[0.8, 0.2], [0.6, 0.4]])
    assert float(inter_class_relation(p_s, p_t)) == pytest.approx(1.0, abs=1e-6)
    assert float(intra_class_relation(p_s, p_t)) == pytest.approx(0.0, abs=1e-6)
    for tau in (1.0, 2.0):  # logits τ·log p give back p after softmax(·/τ)
        inter, intra = dist_terms(tau * p_s.log(), tau * p_t.log(), tau)
        assert float(inter) == pytest.approx(tau * tau, abs=1e-5)
        assert float(intra) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "tau, inter, intra",
    [(1.0, 0.3157656395471599, 0.24420945856526982), (4.0, 4.221944476741748, 5.201888736163097)],
)
def test_golden_3x4(tau, inter, intra):
    """Pinned values (computed once with the numpy reference above), and the reference itself, agree."""
    ref = np_dist(S, T, tau)
    assert ref == pytest.approx((inter, intra), rel=1e-12)
    got = dist_terms(f64(S), f64(T), tau)
    assert [float(g) for g in got] == pytest.approx(ref, rel=1e-10)
    got32 = dist_terms(torch.tensor(S), torch.tensor(T), tau)  # float32
    assert [float(g) for g in got32] == pytest.approx(ref, rel=1e-5)
    assert float(dist_loss(f64(S), f64(T), tau, beta=0.5, gamma=3.0)) == pytest.approx(
        0.5 * ref[0] + 3.0 * ref[1], rel=1e-10
    )


def test_defaults_are_the_cifar_recipe():
    o = DISTOptions()
    assert (o.ce_weight, o.beta, o.gamma, o.temperature) == (1.0, 2.0, 2.0, 4.0)
    ref = np_dist(S, T, 4.0)
    assert float(dist_loss(f64(S), f64(T))) == pytest.approx(2 * ref[0] + 2 * ref[1], rel=1e-10)


# ------------------------------------------------------------------------------------------- invariances
def test_identical_logits_give_zero_up_to_the_epsilon():
    torch.manual_seed(0)
    z = 3 * torch.randn(8, 10, dtype=torch.float64)
    inter, intra = dist_terms(z, z.clone(), 4.0)
    assert 0.0 <= float(inter) < 1e-5 and 0.0 <= float(intra) < 1e-5
    # exactly what the epsilon leaves: 1 − n²/(n² + ε) per row / column of centred probabilities
    p = np_softmax(z.numpy() / 4.0)
    rows = ((p - p.mean(1, keepdims=True)) ** 2).sum(1)
    cols = ((p - p.mean(0, keepdims=True)) ** 2).sum(0)
    assert float(inter) == pytest.approx(16 * np.mean(1 - rows / (rows + EPS)), rel=1e-4, abs=1e-15)
    assert float(intra) == pytest.approx(16 * np.mean(1 - cols / (cols + EPS)), rel=1e-4, abs=1e-15)


def test_relations_are_invariant_to_a_positive_affine_map_of_the_predictions():
    torch.manual_seed(1)
    p_s = torch.softmax(2 * torch.randn(6, 5, dtype=torch.float64), 1)
    p_t = torch.softmax(2 * torch.randn(6, 5, dtype=torch.float64), 1)
    inter, intra = inter_class_relation(p_s, p_t), intra_class_relation(p_s, p_t)
    for a, b in [(3.0, -0.7), (0.5, 2.0)]:  # the same a·p + b on either side
        torch.testing.assert_close(inter_class_relation(a * p_s + b, p_t), inter)
        torch.testing.assert_close(inter_class_relation(p_s, a * p_t + b), inter)
        torch.testing.assert_close(intra_class_relation(a * p_s + b, p_t), intra)
        torch.testing.assert_close(intra_class_relation(p_s, a * p_t + b), intra)
    # per-sample maps leave the inter-class relation alone, per-class maps the intra-class one
    a_row, b_row = torch.rand(6, 1, dtype=torch.float64) + 0.5, torch.randn(6, 1, dtype=torch.float64)
    a_col, b_col = torch.rand(1, 5, dtype=torch.float64) + 0.5, torch.randn(1, 5, dtype=torch.float64)
    torch.testing.assert_close(inter_class_relation(a_row * p_s + b_row, p_t), inter)
    torch.testing.assert_close(intra_class_relation(a_col * p_s + b_col, p_t), intra)
    # a negative scale flips each correlation: 1 − ρ becomes 1 + ρ
    torch.testing.assert_close(inter_class_relation(-p_s, p_t), 2 - inter)
    torch.testing.assert_close(intra_class_relation(-2 * p_s + 1, p_t), 2 - intra)


def test_per_sample_logit_shift_changes_nothing_but_a_per_class_shift_does():
    torch.manual_seed(2)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    base = dist_terms(s, t, 4.0)
    shifted = dist_terms(s + 10 * torch.randn(5, 1, dtype=torch.float64), t - 3.0, 4.0)
    for a, b in zip(base, shifted):
        torch.testing.assert_close(a, b)
    by_class = dist_terms(s + torch.linspace(-2, 2, 7, dtype=torch.float64), t, 4.0)
    assert all(abs(float(a - b)) > 1e-3 for a, b in zip(base, by_class))


def test_symmetric_and_bounded():
    torch.manual_seed(3)
    s, t = 4 * torch.randn(6, 9, dtype=torch.float64), 4 * torch.randn(6, 9, dtype=torch.float64)
    for a, b in zip(dist_terms(s, t, 2.0), dist_terms(t, s, 2.0)):
        torch.testing.assert_close(a, b)
    for v in dist_terms(s, -s, 1.0):  # far apart, yet within [0, 2τ²]
        assert 0.0 < float(v) <= 2.0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="logit"):
        dist_terms(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logit"):
        dist_terms(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))


# --------------------------------------------------------------------------------------------- gradients
def test_gradcheck_float64():
    torch.manual_seed(4)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dist_loss(a, b, 2.0, 1.5, 0.5), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: torch.stack(dist_terms(a, b, 4.0)), (s, t))


def test_float32_under_bf16_autocast():
    torch.manual_seed(5)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dist_terms(s.bfloat16(), t.bfloat16(), 4.0)
    assert all(g.dtype == torch.float32 for g in got)
    ref = dist_terms(s.bfloat16().float(), t.bfloat16().float(), 4.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- the method, end to end
def _pair(student: str, teacher: str, **opts):
    torch.manual_seed(0)
    s, t = build_network(student, 10, 3), build_network(teacher, 10, 3)
    x = torch.randn(16, 3, 32, 32)
    return mimkd.build_distiller("dist", s, t, x, num_classes=10, **opts), x


def test_terms_are_weighted_and_named():
    d, x = _pair("resnet8", "resnet14", beta=0.5, gamma=3.0, temperature=2.0)
    y = torch.arange(16) % 10
    d.eval()  # the same logits in compute and in the reference below
    with torch.no_grad():
        _, terms = d(x, y, None)
        inter, intra = dist_terms(d.student(x), d.teacher(x), 2.0)
        ce = torch.nn.functional.cross_entropy(d.student(x), y)
    assert set(terms) == {"ce", "dist_inter", "dist_intra"}
    torch.testing.assert_close(terms["dist_inter"], 0.5 * inter)
    torch.testing.assert_close(terms["dist_intra"], 3.0 * intra)
    torch.testing.assert_close(terms["ce"], ce)
    d2, _ = _pair("resnet8", "resnet14", ce_weight=0, gamma=0)
    assert set(d2(x, y, None)[1]) == {"dist_inter"}  # a term whose weight is 0 is not computed


@pytest.mark.parametrize("student, teacher", [("resnet8", "resnet14"), ("resnet8", "vgg8")])
def test_real_steps_lower_the_loss(student, teacher):
    d, x = _pair(student, teacher)
    y = torch.arange(16) % 10
    opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.05, momentum=0.9)
    step = TrainStep(d.train(), opt)
    t_before = [p.detach().clone() for p in d.teacher.parameters()]
    totals = []
    for _ in range(6):
        out = step(x, y, torch.arange(16))
        assert set(out.terms) == {"ce", "dist_inter", "dist_intra"}
        assert all(torch.isfinite(v) for v in out.terms.values()), out.terms
        assert out.applied
        totals.append(float(out.total))
    assert totals[-1] < totals[0], totals
    assert all(torch.equal(a, b) for a, b in zip(t_before, d.teacher.parameters()))


def test_unknown_and_invalid_options_are_refused():
    s, t, x = build_network("resnet8", 10, 3), build_network("resnet14", 10, 3), torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="unknown option"):
        mimkd.build_distiller("dist", s, t, x, tau=4.0)
    with pytest.raises(ConfigError, match="temperature"):
        mimkd.build_distiller("dist", s, t, x, temperature=0.0)
    with pytest.raises(ConfigError, match="beta"):
        mimkd.build_distiller("dist", s, t, x, beta=-1.0)
    assert "dist" in mimkd.distillers.available()
