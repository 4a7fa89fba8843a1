"""AT, SP, PKT, NST, RKD, CC (docs/methods/): exact-zero oracles, hand-computed values, RepDistiller's
default weights (docs/methods/README.md), option validation, one real optimisation step on a same-family
and a cross-architecture pair."""

from __future__ import annotations

import math

import pytest
import torch

import mimkd
from mimkd.distillers import get_method
from mimkd.distillers.at import at_loss
from mimkd.distillers.cc import cc_loss
from mimkd.distillers.nst import nst_loss
from mimkd.distillers.pkt import pkt_loss
from mimkd.distillers.rkd import rkd_loss
from mimkd.distillers.sp import sp_loss
from mimkd.errors import ConfigError, MethodError
from mimkd.models import build_model

METHODS = ["at", "sp", "pkt", "nst", "rkd", "cc"]
ATOL = 1e-6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


# -- RepDistiller's default weights, option validation ---------------------------------------------------
@pytest.mark.parametrize(
    "name,beta,extra",
    [
        ("at", 1000.0, {"p": 2.0}),
        ("sp", 3000.0, {}),
        ("pkt", 30000.0, {}),
        ("nst", 50.0, {}),
        ("rkd", 1.0, {"w_d": 25.0, "w_a": 50.0}),
        ("cc", 0.02, {"feat_dim": 128}),
    ],
)
def test_defaults_are_repdistillers_command_line(name, beta, extra):
    o = get_method(name).Options()
    assert (o.ce_weight, o.kd_weight, o.weight, o.kd_temperature) == (1.0, 0.0, beta, 4.0)
    for key, value in extra.items():
        assert getattr(o, key) == value
    assert set(o.model_dump()) == {"ce_weight", "kd_weight", "kd_temperature", "weight", *extra}


@pytest.mark.parametrize("name", METHODS)
def test_unknown_and_invalid_options_are_refused(name):
    t, s = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="unknown option"):
        mimkd.build_distiller(name, s, t, x, num_classes=10, bogus=1)
    with pytest.raises(ConfigError):
        mimkd.build_distiller(name, s, t, x, num_classes=10, weight=-1.0)
    with pytest.raises(MethodError):
        mimkd.build_distiller(name, s, None, x, num_classes=10)


# -- exact-zero cases ------------------------------------------------------------------------------------
def test_at_zero_under_positive_rescaling_and_channel_duplication():
    ft = [_randn(4, 8, 8, 8, seed=1), _randn(4, 16, 4, 4, seed=2)]
    assert at_loss([3.7 * f for f in ft], ft).item() == pytest.approx(0.0, abs=ATOL)
    # a(F) averages over channels: the same map repeated on twice the channels has the same attention
    assert at_loss([torch.cat([f, -f], 1) for f in ft], ft).item() == pytest.approx(0.0, abs=ATOL)
    assert at_loss([_randn(4, 8, 8, 8, seed=3), ft[1]], ft).item() > 1e-3


def test_sp_zero_under_positive_rescaling_and_any_width():
    ft = _randn(4, 16, 4, 4, seed=1)
    assert sp_loss(0.01 * ft, ft).item() == pytest.approx(0.0, abs=ATOL)
    # different channel count: [F, F] has Gram 2·G_t, equal after row normalisation
    assert sp_loss(torch.cat([ft, ft], 1), ft).item() == pytest.approx(0.0, abs=ATOL)
    assert sp_loss(_randn(4, 16, 4, 4, seed=2), ft).item() > 1e-4


def test_pkt_zero_under_positive_rescaling():
    ft = _randn(4, 64, seed=1)
    assert pkt_loss(5.0 * ft, ft).item() == pytest.approx(0.0, abs=ATOL)
    assert pkt_loss(_randn(4, 64, seed=2), ft).item() > 1e-4


def test_nst_zero_for_identical_maps_channel_rescaling_and_permutation():
    ft = [_randn(4, 8, 8, 8, seed=1), _randn(4, 6, 4, 4, seed=2)]
    assert nst_loss([f.clone() for f in ft], ft).item() == pytest.approx(0.0, abs=ATOL)
    scale = [torch.rand(1, f.shape[1], 1, 1, generator=_gen(3)) + 0.1 for f in ft]
    assert nst_loss([f * w for f, w in zip(ft, scale)], ft).item() == pytest.approx(0.0, abs=ATOL)
    assert nst_loss([f.flip(1) for f in ft], ft).item() == pytest.approx(0.0, abs=ATOL)
    assert nst_loss([_randn(4, 8, 8, 8, seed=4), ft[1]], ft).item() > 1e-3


def test_rkd_zero_under_positive_affine_map_and_isometric_widening():
    ft = _randn(5, 16, seed=1)
    b = _randn(16, seed=2)
    assert rkd_loss(2.5 * ft + b, ft).item() == pytest.approx(0.0, abs=ATOL)
    q, _ = torch.linalg.qr(_randn(32, 16, seed=3).double())  # 32×16 with orthonormal columns
    assert rkd_loss((ft.double() @ q.t()).float(), ft).item() == pytest.approx(0.0, abs=1e-5)
    assert rkd_loss(_randn(5, 16, seed=4), ft).item() > 1e-2


def test_cc_zero_for_identical_embeddings():
    e = _randn(4, 128, seed=1)
    assert cc_loss(e.clone(), e).item() == 0.0
    assert cc_loss(_randn(4, 128, seed=2), e).item() > 0.0


# -- hand-computed values ---------------------------------------------------------------------------------
def test_at_hand_computed_with_pooling_and_two_pairs():
    # student map [1, 1] over 2 channels ([1, 1] and [1, −1]): mean_c F² = [1, 1] → a_s = [1, 1]/√2
    s = torch.tensor([[[[1.0, 1.0]], [[1.0, -1.0]]]])  # 1×2×1×2
    t = torch.tensor([[[[1.0, 0.0]]]])  # 1×1×1×2 → a_t = [1, 0]
    per_pair = ((1 - 1 / math.sqrt(2)) ** 2 + 0.5) / 2  # = 1 − 1/√2
    assert at_loss([s], [t]).item() == pytest.approx(per_pair, abs=1e-6)
    # a 2×4 teacher map whose 2×2 blocks average to [1, 0] is pooled to the student's 1×2 first
    t_big = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]]])
    assert at_loss([s, s], [t, t_big]).item() == pytest.approx(2 * (1 - 1 / math.sqrt(2)), abs=1e-6)


def test_sp_hand_computed():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)  # G_t = I
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 2, 1, 1)  # G_s rows = [1, 1]/√2
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r**2) / 4
    assert sp_loss(s, t).item() == pytest.approx(expected, abs=1e-6)


def test_pkt_hand_computed():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos = I → (c+1)/2 rows [1, .5] → [2/3, 1/3]
    s = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # cos = 1 → rows [1/2, 1/2]
    expected = 2 * (2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)) / 4
    assert pkt_loss(s, t).item() == pytest.approx(expected, abs=1e-6)


def test_nst_hand_computed():
    t = torch.tensor([3.0, 0.0]).view(1, 1, 1, 2)  # one channel → [1, 0]
    s = torch.tensor([[2.0, 0.0], [0.0, 5.0]]).view(1, 2, 1, 2)  # channels → [1, 0], [0, 1]
    # k(t,t) = [1] → 1; k(s,s) = I → 1/2; k(s,t) = [1, 0] → 1/2: 1 + 1/2 − 2·1/2
    assert nst_loss([s], [t]).item() == pytest.approx(0.5, abs=1e-6)
    # non-orthogonal channels: t → [0.6, 0.8]; s → [1, 0], [1, 1]/√2
    t = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    s = torch.tensor([[2.0, 0.0], [0.5, 0.5]]).view(1, 2, 1, 2)
    k_ss = (1 + 0.5 + 0.5 + 1) / 4
    k_st = (0.6**2 + (1.4 / math.sqrt(2)) ** 2) / 2
    assert nst_loss([s], [t]).item() == pytest.approx(1 + k_ss - 2 * k_st, abs=1e-6)


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_hand_computed_distance_and_angle_terms():
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right isosceles triangle
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # collinear points
    # distances (pairs 01, 02, 12) divided by their mean over the 6 off-diagonal entries
    dt = [1.0, 1.0, math.sqrt(2)]
    ds = [1.0, 2.0, 1.0]
    dt = [d / (sum(dt) / 3) for d in dt]
    ds = [d / (sum(ds) / 3) for d in ds]
    dist = 2 * sum(_smooth_l1(a - b) for a, b in zip(ds, dt)) / 9  # each pair twice, zero diagonal
    # angles: per anchor i, two entries with j = k (cos 1 on both sides) and two with j ≠ k
    at = [0.0, math.sqrt(0.5), math.sqrt(0.5)]  # cos at vertex 0, 1, 2 of the triangle
    as_ = [1.0, -1.0, 1.0]
    ang = 2 * sum(_smooth_l1(a - b) for a, b in zip(as_, at)) / 27
    assert rkd_loss(s, t, w_d=1.0, w_a=0.0).item() == pytest.approx(dist, abs=1e-6)
    assert rkd_loss(s, t, w_d=0.0, w_a=1.0).item() == pytest.approx(ang, abs=1e-6)
    assert rkd_loss(s, t).item() == pytest.approx(25 * dist + 50 * ang, abs=1e-5)


def test_cc_hand_computed():
    e_t = torch.zeros(3, 2)
    e_s = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 1.0]])  # Δ rows [1,2], [3,0], [1,1]
    assert cc_loss(e_s, e_t).item() == pytest.approx((3.0 + 3.0) / 2)


def test_teacher_side_gets_no_gradient_and_batch_of_one_is_refused():
    s, t = _randn(4, 8, seed=1).requires_grad_(), _randn(4, 8, seed=2).requires_grad_()
    rkd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    ms, mt = _randn(2, 3, 4, 4, seed=1).requires_grad_(), _randn(2, 5, 4, 4, seed=2).requires_grad_()
    nst_loss([ms], [mt]).backward()
    assert mt.grad is None and ms.grad.abs().sum() > 0
    with pytest.raises(MethodError):
        rkd_loss(_randn(1, 8), _randn(1, 8))
    with pytest.raises(MethodError):
        cc_loss(_randn(1, 8), _randn(1, 8))


# -- wiring on real networks ----------------------------------------------------------------------------
def _stages(name):
    return list(build_model(name).feature_points.maps)


@pytest.mark.parametrize("t_name,s_name,n_pairs", [("resnet56", "resnet20", 3), ("vgg13", "MobileNetV2", 4)])
def test_map_methods_pair_feature_lists_by_position(t_name, s_name, n_pairs):
    torch.manual_seed(0)
    t, s = build_model(t_name), build_model(s_name)
    x = torch.randn(2, 3, 32, 32)
    tm, sm = _stages(t_name), _stages(s_name)
    for name in ("at", "nst"):
        d = mimkd.build_distiller(name, s, t, x)
        assert d.pairs == list(zip(tm, sm))[:n_pairs] and len(d.pairs) == n_pairs


def test_vector_methods_read_repdistillers_points():
    t, s = build_model("vgg13"), build_model("MobileNetV2")
    x = torch.randn(2, 3, 32, 32)
    tp, sp = t.feature_points, s.feature_points
    wanted = {"sp": (sp.stages[-1], tp.stages[-1])}  # feat[-2]
    wanted |= {m: (sp.embedding, tp.embedding) for m in ("pkt", "rkd", "cc")}  # feat[-1]
    for name, (s_point, t_point) in wanted.items():
        d = mimkd.build_distiller(name, s, t, x)
        assert (d.s_tap.points, d.t_tap.points) == ([s_point], [t_point])
        d.s_tap.remove()
        d.t_tap.remove()
    assert (sp.stages[-1], tp.stages[-1]) == ("blocks.6", "relu4")


def test_cc_embeddings_are_sized_from_the_probed_vectors_and_trainable():
    t, s = build_model("resnet32x4", num_classes=10), build_model("resnet8", num_classes=10)
    d = mimkd.build_distiller("cc", s, t, torch.randn(2, 3, 32, 32), feat_dim=16)
    assert (d.embed_s.in_features, d.embed_t.in_features) == (64, 256)
    assert d.embed_s.out_features == d.embed_t.out_features == 16
    names = {n for n, _ in d.trainable_named_parameters()}
    assert {"embed_s.weight", "embed_t.weight"} <= names
    assert "embed_t.weight" in d.method_state_dict()


@pytest.mark.parametrize("name", METHODS)
def test_method_term_is_beta_times_the_loss(name):
    torch.manual_seed(0)
    t, s = build_model("resnet20", num_classes=10), build_model("resnet8", num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    d1 = mimkd.build_distiller(name, s, t, x, weight=1.0).eval()
    d2 = mimkd.build_distiller(name, s, t, x, weight=7.0, ce_weight=0.0, kd_weight=0.5).eval()
    if name == "cc":
        d2.load_method_state_dict(d1.method_state_dict())
    with torch.no_grad():
        _, t1 = d1(x, y)
        _, t2 = d2(x, y)
    assert set(t1) == {"ce", name} and set(t2) == {"kd", name}
    assert t1[name].item() > 0
    assert t2[name].item() == pytest.approx(7.0 * t1[name].item(), rel=1e-5)
    for tap in (d1.s_tap, d1.t_tap, d2.s_tap, d2.t_tap):
        tap.remove()


PAIRS = [("resnet56", "resnet20"), ("vgg13", "MobileNetV2")]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("t_name,s_name", PAIRS)
def test_one_real_optimisation_step(name, t_name, s_name):
    _real_step(name, t_name, s_name)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("t_name,s_name", [("resnet32x4", "ShuffleV1"), ("ResNet50", "vgg8")])
def test_one_real_optimisation_step_heavy_pairs(name, t_name, s_name):
    _real_step(name, t_name, s_name)


def _real_step(name, t_name, s_name):
    torch.manual_seed(0)
    t = build_model(t_name, num_classes=100, in_channels=3)
    s = build_model(s_name, num_classes=100, in_channels=3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    d = mimkd.build_distiller(name, s, t, x[:2], num_classes=100, train_labels=torch.arange(64) % 100)
    d.train()
    params = [p for _, p in d.trainable_named_parameters()]
    assert not any(p is q for p in params for q in t.parameters())
    s_before = [p.detach().clone() for p in s.parameters()]
    t_before = [p.detach().clone() for p in t.parameters()]
    t_buffers = [b.clone() for b in t.buffers()]

    logits, terms = d(x, y)
    assert logits.shape == (4, 100) and set(terms) == {"ce", name}
    assert all(torch.isfinite(v) for v in terms.values()) and terms[name].item() > 0
    # the method term alone reaches the student
    grads = torch.autograd.grad(terms[name], list(s.parameters()), retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    loss = sum(terms.values())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(s_before, s.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(t_before, t.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(t_buffers, t.buffers()))  # eval mode: BN stats frozen
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    if name == "cc":
        assert d.embed_s.weight.grad.abs().sum() > 0 and d.embed_t.weight.grad.abs().sum() > 0
