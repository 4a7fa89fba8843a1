"""MLKD (``mlkd``, ``mlkd+ls``), docs/methods/mlkd.md.

Golden values come from numpy written here, independently of the implementation: explicit per-sample KL
sums, Gram matrices built entry by entry, ``np.percentile`` medians, and the reference code's arithmetic
spelled out term by term (a scalar batch mean times a boolean mask, then ``.mean()``; the strong view's
instance terms at temperatures 2 and 6 on the weak logits; no strong class or batch terms). Invariances,
float64 gradchecks, the views contract, and real optimisation steps on a same-family and a cross-architecture
zoo pair with a real strong view of Fashion-MNIST-sized images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mimkd
from mimkd.distillers import available, get_method, validate_options
from mimkd.distillers.mlkd import (
    batch_relation,
    class_relation,
    confidence_masks,
    instance_kd,
    mlkd_terms,
)
from mimkd.engine.step import TrainStep
from mimkd.errors import ConfigError
from mimkd.models import build_network

TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)
RNG = np.random.default_rng(0)
SW, TW, SS, TS = (RNG.normal(size=(6, 5)) * 2 for _ in range(4))  # student/teacher, weak/strong


# -- an independent numpy derivation ----------------------------------------------------------------------
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kd_rows(s, t, temp, standardize=False):
    if standardize:
        s = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-7)
        t = (t - t.mean(1, keepdims=True)) / (t.std(1, ddof=1, keepdims=True) + 1e-7)
    ps, pt = np_softmax(s / temp), np_softmax(t / temp)
    return (
        np.array(
            [sum(pt[b, k] * np.log(pt[b, k] / ps[b, k]) for k in range(s.shape[1])) for b in range(len(s))]
        )
        * temp**2
    )


def np_gram_residual(s, t, temp, level):
    """(G_t − G_s)² / size, entry by entry; class level: C×C over the batch, batch level: B×B over classes."""
    ps, pt = np_softmax(s / temp), np_softmax(t / temp)
    if level == "class":
        ps, pt = ps.T, pt.T
    n = ps.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = (pt[i] @ pt[j] - ps[i] @ ps[j]) ** 2
    return out / n


def np_masks(tw):
    p = np_softmax(tw)
    conf, per_class = p.max(1), p.sum(0)
    return conf <= np.percentile(conf, 50), per_class <= np.percentile(per_class, 50)


def np_reference(sw, tw, ss, ts, temps=TEMPS, standardize=False):
    """The released code's arithmetic, term by term."""
    m, cm = np_masks(tw)
    kd_weak = sum((np_kd_rows(sw, tw, t, standardize).mean() * m).mean() for t in temps)
    strong_pairs = [(ss, ts)] * 3 + [(sw, tw)] * 2  # temperatures 2 and 6 read the weak logits
    kd_strong = sum(np_kd_rows(*pair, t, standardize).mean() for pair, t in zip(strong_pairs, temps))
    cc = sum((np_gram_residual(sw, tw, t, "class").sum() * cm).mean() for t in temps)
    bc = sum((np_gram_residual(sw, tw, t, "batch").sum() * m).mean() for t in temps)
    return {"kd": kd_weak + kd_strong, "cc": cc, "bc": bc}


def np_per_sample(sw, tw, ss, ts, temps=TEMPS):
    """The reference with its commented-out ``reduce=False``: masks per sample / class column."""
    m, cm = np_masks(tw)
    kd = sum((np_kd_rows(sw, tw, t) * m).mean() + np_kd_rows(ss, ts, t).mean() for t in temps)
    cc = sum((np_gram_residual(sw, tw, t, "class") * cm[None, :]).mean() for t in temps)
    bc = sum((np_gram_residual(sw, tw, t, "batch") * m[None, :]).mean() for t in temps)
    return {"kd": kd, "cc": cc, "bc": bc}


def f64(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# -- golden values ------------------------------------------------------------------------------------------
def test_levels_match_the_entrywise_derivation():
    for temp in TEMPS:
        np.testing.assert_allclose(
            instance_kd(f64(SW), f64(TW), temp).numpy(), np_kd_rows(SW, TW, temp), rtol=1e-12
        )
        np.testing.assert_allclose(
            class_relation(f64(SW), f64(TW), temp).numpy(),
            np_gram_residual(SW, TW, temp, "class"),
            rtol=1e-10,
        )
        np.testing.assert_allclose(
            batch_relation(f64(SW), f64(TW), temp).numpy(),
            np_gram_residual(SW, TW, temp, "batch"),
            rtol=1e-10,
        )


def test_masks_keep_the_less_confident_half_by_np_percentile():
    m, cm = confidence_masks(f64(TW))
    want_m, want_cm = np_masks(TW)
    assert m.tolist() == want_m.tolist() and cm.tolist() == want_cm.tolist()
    assert m.sum().item() == 3 and cm.sum().item() == 3  # 6 samples, 5 classes: the median itself is kept
    odd = f64(TW[:5])
    assert confidence_masks(odd)[0].sum().item() == 3


@pytest.mark.parametrize("standardize", [False, True])
def test_released_arithmetic_golden(standardize):
    got = mlkd_terms(f64(SW), f64(TW), f64(SS), f64(TS), TEMPS, standardize=standardize)
    want = np_reference(SW, TW, SS, TS, standardize=standardize)
    for k in ("kd", "cc", "bc"):
        assert got[k].item() == pytest.approx(want[k], rel=1e-10), k


def test_released_arithmetic_pinned():
    got = {k: round(v.item(), 6) for k, v in mlkd_terms(f64(SW), f64(TW), f64(SS), f64(TS)).items()}
    want = {k: round(v, 6) for k, v in np_reference(SW, TW, SS, TS).items()}
    assert got == want
    assert got == PINNED


PINNED = {"kd": 19.572579, "cc": 0.080245, "bc": 0.009133}  # the numpy derivation, rounded


def test_per_sample_masks_golden():
    got = mlkd_terms(f64(SW), f64(TW), f64(SS), f64(TS), TEMPS, as_released=False)
    want = np_per_sample(SW, TW, SS, TS)
    for k in ("kd", "cc", "bc"):
        assert got[k].item() == pytest.approx(want[k], rel=1e-10), k


def test_released_strong_terms_at_2_and_6_ignore_the_strong_logits():
    """Only the first three temperatures see the strong view; the class and batch terms never do."""
    other = f64(SS) * 3 + 1
    base = mlkd_terms(f64(SW), f64(TW), f64(SS), f64(TS))
    moved = mlkd_terms(f64(SW), f64(TW), other, f64(TS))
    assert moved["cc"].item() == base["cc"].item() and moved["bc"].item() == base["bc"].item()
    first_three = sum(
        instance_kd(f64(SS), f64(TS), t).mean() - instance_kd(other, f64(TS), t).mean() for t in TEMPS[:3]
    )
    assert (base["kd"] - moved["kd"]).item() == pytest.approx(first_three.item(), rel=1e-10)
    assert abs(first_three.item()) > 1e-3


# -- invariances ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_released", [True, False])
def test_identical_logits_give_zero(as_released):
    terms = mlkd_terms(f64(TW), f64(TW), f64(TS), f64(TS), as_released=as_released)
    assert all(abs(v.item()) < 1e-14 for v in terms.values()), terms


def test_standardization_zeroes_only_the_instance_terms_of_an_affine_student():
    """A student whose logits are 3·t + 1 matches after z-scoring: kd → 0 (to ε), cc and bc do not."""
    sw, ss = 3 * f64(TW) + 1, 3 * f64(TS) + 1
    ls = mlkd_terms(sw, f64(TW), ss, f64(TS), standardize=True)
    plain = mlkd_terms(sw, f64(TW), ss, f64(TS), standardize=False)
    assert ls["kd"].item() < 1e-12 < plain["kd"].item()
    assert ls["cc"].item() == plain["cc"].item() > 0 and ls["bc"].item() == plain["bc"].item() > 0


def test_a_per_sample_shift_of_the_logits_changes_nothing():
    shift = f64(RNG.normal(size=(6, 1)))
    a = mlkd_terms(f64(SW), f64(TW), f64(SS), f64(TS))
    b = mlkd_terms(f64(SW) + shift, f64(TW) - shift, f64(SS) + 2 * shift, f64(TS))
    for k in a:
        assert b[k].item() == pytest.approx(a[k].item(), rel=1e-10)


@pytest.mark.parametrize("as_released", [True, False])
def test_gradcheck_float64(as_released):
    ins = [f64(a).requires_grad_() for a in (SW, SS)]

    def f(sw, ss):
        t = mlkd_terms(sw, f64(TW), ss, f64(TS), as_released=as_released, standardize=True)
        return t["kd"] + t["cc"] + t["bc"]

    assert torch.autograd.gradcheck(f, ins)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="logit shapes differ"):
        mlkd_terms(f64(SW), f64(TW), f64(SS[:, :4]), f64(TS))


# -- the method: options, views, real steps -----------------------------------------------------------------
def test_registered_names_and_defaults():
    assert {"mlkd", "mlkd+ls"} <= set(available())
    o = validate_options("mlkd", {})
    assert (o.temperature, o.extra_temperatures, o.ce_weight, o.kd_weight) == (
        4.0,
        (3.0, 5.0, 2.0, 6.0),
        0.1,
        0.9,
    )
    assert o.logit_standardize is False and o.as_released is True
    ls = validate_options("mlkd+ls", {})
    assert (ls.temperature, ls.kd_weight, ls.ce_weight, ls.logit_standardize) == (2.0, 9.0, 0.1, True)
    assert get_method("mlkd").capabilities.views == ("strong",)
    with pytest.raises(ConfigError):
        validate_options("mlkd", {"extra_temperatures": [3.0, 0.0]})


def test_a_call_without_the_strong_view_says_how_to_pass_it():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    d = mimkd.build_distiller(
        "mlkd", build_network("conv4mp_w32", 10, 1), build_network("cnn_teacher", 10, 1), x
    )
    with pytest.raises(ValueError, match="views=.*strong"):
        d(x, torch.arange(4))


def _strong_batch(n: int, channels: int, size: int):
    from mimkd.data import BatchAugment
    from mimkd.data.views import build_views

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    base = BatchAugment([0.5] * channels, [0.25] * channels, crop_padding=4, flip=True)
    strong = build_views(["strong"], base)["strong"]
    return base(raw, g), strong(raw, g)


@pytest.mark.parametrize("method", ["mlkd", "mlkd+ls"])
@pytest.mark.parametrize(("student", "teacher"), [("resnet8", "resnet14"), ("resnet8", "vgg8")])
def test_optimisation_steps_on_zoo_pairs(method, student, teacher):
    torch.manual_seed(0)
    s_net, t_net = build_network(student, 10, 3), build_network(teacher, 10, 3)
    weak, strong = _strong_batch(8, 3, 32)
    assert not torch.equal(weak, strong)
    y = torch.arange(8) % 10
    d = mimkd.build_distiller(method, s_net, t_net, weak, num_classes=10)
    before = [p.detach().clone() for p in s_net.parameters()]
    opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.002)
    step = TrainStep(d.train(), opt)
    totals = []
    for _ in range(4):
        r = step(weak, y, torch.arange(8), views={"strong": strong})
        assert r.applied is True and all(torch.isfinite(v) for v in r.terms.values()), r.terms
        totals.append(r.total.item())
    assert set(r.terms) == {"ce", "kd", "cc", "bc"}
    assert totals[-1] < totals[0], totals
    assert any(not torch.equal(a, p) for a, p in zip(before, s_net.parameters()))
    assert all(p.grad is None for p in t_net.parameters())


def test_terms_are_the_weighted_reference_terms():
    torch.manual_seed(0)
    weak, strong = _strong_batch(6, 1, 28)
    s_net, t_net = build_network("conv4mp_w32", 10, 1), build_network("cnn_teacher", 10, 1)
    d = mimkd.build_distiller("mlkd", s_net, t_net, weak, kd_weight=0.5, ce_weight=0.2).eval()
    y = torch.arange(6) % 10
    logits, terms = d(weak, y, views={"strong": strong})
    with torch.no_grad():
        sw, ss, tw, ts = s_net(weak), s_net(strong), t_net(weak), t_net(strong)
    assert torch.equal(logits, sw)
    ce = torch.nn.functional.cross_entropy
    assert terms["ce"].item() == pytest.approx(0.2 * (ce(sw, y) + ce(ss, y)).item(), rel=1e-6)
    parts = mlkd_terms(sw, tw, ss, ts)
    for k in ("kd", "cc", "bc"):
        assert terms[k].item() == pytest.approx(0.5 * parts[k].item(), rel=1e-6)


def test_describe_counts_the_strong_view():
    from mimkd.describe import describe, format_description

    info = describe("mlkd", "resnet8", "resnet14", data="cifar100")
    kd = describe("kd", "resnet8", "resnet14", data="cifar100")
    assert info["views"] == ["strong"] and kd["views"] == []
    f, g = info["flops_per_image"], kd["flops_per_image"]
    # a second student step and teacher forward: the method's share is about one student step + one teacher
    extra = f["total_train_step"] - g["total_train_step"]
    want = g["student_train_step"] + g["teacher_forward"]
    assert 0.95 * want < extra < 1.05 * want
    assert "extra views of each batch: strong" in format_description(info)
