"""Logit methods: DKD (``dkd``, ``dkd+ls``) and logit standardisation (``kd`` with ``logit_standardize``,
``kd+ls``), docs/methods/dkd.md and docs/methods/logit_std.md.

Golden values come from numpy written here, independently of the implementation (explicit softmaxes and KL
sums over small logits), and are also pinned as literals; the reference formula of mdistiller's DKD (a mask
and a −1000 shift on the target logit) is re-derived here with plain torch ops and compared on random
logits. Invariances, float64 gradchecks, the warm-up through a real StepContext, and real optimisation steps
on zoo pairs through ``build_distiller`` and ``TrainStep``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mimkd
from mimkd.distillers import StepContext, available, get_method, validate_options
from mimkd.distillers.dkd import dkd_loss, dkd_terms
from mimkd.distillers.kd import kd_loss
from mimkd.distillers.logit_std import LS_EPS, standardize_logits
from mimkd.engine.step import TrainStep
from mimkd.errors import ConfigError
from mimkd.models import build_network

# a 2 × 4 example: sample 0 of class 1, sample 1 of class 3
S = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 1.5, 2.5]])
T = np.array([[2.0, 1.0, 0.0, -2.0], [1.0, 0.0, 3.0, 0.5]])
Y = np.array([1, 3])


# -- an independent numpy derivation ----------------------------------------------------------------------
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) of each row."""
    return (p * np.log(p / q)).sum(axis=1)


def np_standardize(z: np.ndarray) -> np.ndarray:
    """Z-score over the classes with the unbiased std (ddof=1), ε added to the std."""
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def np_kd(s, t, temp):
    return np_kl(np_softmax(t / temp), np_softmax(s / temp)).mean() * temp**2


def np_tckd(s, t, y, temp):
    rows = np.arange(len(y))
    ps, pt = np_softmax(s / temp), np_softmax(t / temp)
    bs = np.stack([ps[rows, y], 1.0 - ps[rows, y]], axis=1)
    bt = np.stack([pt[rows, y], 1.0 - pt[rows, y]], axis=1)
    return np_kl(bt, bs).mean() * temp**2


def np_nckd(s, t, y, temp):
    keep = np.ones_like(s, dtype=bool)
    keep[np.arange(len(y)), y] = False
    s_o, t_o = s[keep].reshape(len(y), -1), t[keep].reshape(len(y), -1)
    return np_kl(np_softmax(t_o / temp), np_softmax(s_o / temp)).mean() * temp**2


def np_ce(s, y):
    return -np.log(np_softmax(s)[np.arange(len(y)), y]).mean()


def tt(a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype)


# -- golden values ---------------------------------------------------------------------------------------
def test_standardize_logits_matches_the_z_score_by_hand():
    z = np.array([[1.0, 2.0, 3.0, 6.0], [-1.0, 0.0, 0.0, 1.0]])
    # row 0: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
    by_hand = (z[0] - 3.0) / (np.sqrt(14.0 / 3.0) + 1e-7)
    out = standardize_logits(tt(z, torch.float64))
    assert np.allclose(out[0].numpy(), by_hand, rtol=0, atol=1e-12)
    assert np.allclose(out.numpy(), np_standardize(z), rtol=0, atol=1e-12)
    assert torch.allclose(out.mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out.std(1), torch.ones(2, dtype=torch.float64), atol=1e-6)  # unbiased std 1
    assert LS_EPS == 1e-7


def test_kd_with_logit_standardization_golden():
    want = np_kd(np_standardize(S), np_standardize(T), 2.0)
    assert want == pytest.approx(0.3515058389338364, rel=1e-12)  # pinned
    got = kd_loss(tt(S), tt(T), 2.0, standardize=True)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-5)
    got64 = kd_loss(tt(S, torch.float64), tt(T, torch.float64), 2.0, standardize=True)
    assert got64.item() == pytest.approx(want, rel=1e-12)
    # without standardisation: plain KD, unchanged
    assert np_kd(S, T, 4.0) == pytest.approx(0.6779376927454506, rel=1e-12)
    assert kd_loss(tt(S), tt(T), 4.0).item() == pytest.approx(np_kd(S, T, 4.0), rel=1e-5)


def test_tckd_and_nckd_golden():
    tckd_np, nckd_np = np_tckd(S, T, Y, 4.0), np_nckd(S, T, Y, 4.0)
    assert tckd_np == pytest.approx(0.5119945811540091, rel=1e-12)  # pinned
    assert nckd_np == pytest.approx(0.22694900247740651, rel=1e-12)
    tckd, nckd = dkd_terms(tt(S, torch.float64), tt(T, torch.float64), torch.tensor(Y), 4.0)
    assert tckd.item() == pytest.approx(tckd_np, rel=1e-12)
    assert nckd.item() == pytest.approx(nckd_np, rel=1e-12)
    tckd32, nckd32 = dkd_terms(tt(S), tt(T), torch.tensor(Y), 4.0)
    assert tckd32.dtype == torch.float32
    assert (tckd32.item(), nckd32.item()) == (
        pytest.approx(tckd_np, rel=1e-5),
        pytest.approx(nckd_np, rel=1e-5),
    )
    total = dkd_loss(tt(S, torch.float64), tt(T, torch.float64), torch.tensor(Y), 1.0, 8.0, 4.0)
    assert total.item() == pytest.approx(tckd_np + 8.0 * nckd_np, rel=1e-12)
    # with logit standardisation (both terms on the z-scored logits)
    ls_t, ls_n = dkd_terms(tt(S, torch.float64), tt(T, torch.float64), torch.tensor(Y), 2.0, standardize=True)
    zs, zt = np_standardize(S), np_standardize(T)
    assert ls_t.item() == pytest.approx(np_tckd(zs, zt, Y, 2.0), rel=1e-10)
    assert ls_n.item() == pytest.approx(np_nckd(zs, zt, Y, 2.0), rel=1e-10)


def test_kd_decomposes_into_tckd_and_weighted_nckd():
    """The paper's identity, per sample: KD = TCKD + (1 − p_t,y) · NCKD (same T, T² on both sides)."""
    for i in range(2):
        s, t, y = tt(S[i : i + 1], torch.float64), tt(T[i : i + 1], torch.float64), torch.tensor(Y[i : i + 1])
        tckd, nckd = dkd_terms(s, t, y, 4.0)
        pt_y = np_softmax(T[i : i + 1] / 4.0)[0, Y[i]]
        assert kd_loss(s, t, 4.0).item() == pytest.approx(tckd.item() + (1 - pt_y) * nckd.item(), rel=1e-12)


def test_two_classes_leave_no_non_target_knowledge():
    s, t, y = (
        torch.randn(5, 2, dtype=torch.float64),
        torch.randn(5, 2, dtype=torch.float64),
        torch.arange(5) % 2,
    )
    tckd, nckd = dkd_terms(s, t, y, 3.0)
    assert nckd.item() == 0.0
    assert tckd.item() == pytest.approx(kd_loss(s, t, 3.0).item(), rel=1e-12)


def _fixed_pair(s: np.ndarray, t: np.ndarray, method: str, **options):
    """A distiller whose student is the identity on its input (the input *is* the student's logits) and whose
    teacher always answers ``t``."""

    class Const(nn.Module):
        def __init__(self, out: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("out", out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out

    x = tt(s)
    return mimkd.build_distiller(method, nn.Identity(), Const(tt(t)), x, **options), x


@pytest.mark.parametrize(("epoch", "factor"), [(0, 1 / 20), (9, 10 / 20), (25, 1.0)])
def test_dkd_total_with_warmup_golden(epoch, factor):
    """mdistiller: ``min(epoch / 20, 1)`` with epoch counted from 1: epochs 1, 10, 26 are our 0, 9, 25."""
    d, x = _fixed_pair(S, T, "dkd")
    ctx = StepContext(stage="main", epoch=epoch, step=3, steps_per_epoch=10, epochs=30)
    assert ctx.warmup(20) == pytest.approx(min((epoch + 1) / 20, 1.0))
    _, terms = d(x, torch.tensor(Y), None, ctx)
    assert set(terms) == {"ce", "tckd", "nckd"}
    tckd, nckd, ce = np_tckd(S, T, Y, 4.0), np_nckd(S, T, Y, 4.0), np_ce(S, Y)
    assert ce == pytest.approx(0.4502406656230771, rel=1e-12)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["tckd"].item() == pytest.approx(factor * 1.0 * tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(factor * 8.0 * nckd, rel=1e-5)
    assert sum(terms.values()).item() == pytest.approx(ce + factor * (tckd + 8.0 * nckd), rel=1e-5)


def test_warmup_through_step_context_matches_the_reference_per_epoch():
    d, x = _fixed_pair(S, T, "dkd", warmup_epochs=20)
    full = d(x, torch.tensor(Y), None)[1]  # a call outside the trainer: the warm-up is over
    for epoch in range(30):
        reference = min((epoch + 1) / 20, 1.0)  # mdistiller: min(epoch / WARMUP, 1), epoch = 1, 2, ...
        for step in (0, 7):  # per whole epoch: the same factor at every step of an epoch
            ctx = StepContext(stage="main", epoch=epoch, step=step, steps_per_epoch=8, epochs=30)
            terms = d(x, torch.tensor(Y), None, ctx)[1]
            assert terms["nckd"].item() == pytest.approx(reference * full["nckd"].item(), rel=1e-6)
            assert terms["ce"].item() == pytest.approx(full["ce"].item(), rel=1e-6)  # CE is not ramped
    d0, _ = _fixed_pair(S, T, "dkd", warmup_epochs=0)  # no warm-up (mdistiller would divide by zero)
    terms = d0(x, torch.tensor(Y), None, StepContext(stage="main", epoch=0, epochs=5))[1]
    assert terms["nckd"].item() == pytest.approx(full["nckd"].item(), rel=1e-6)


def test_dkd_equals_the_reference_formula_on_random_logits():
    """mdistiller's dkd_loss re-derived: softmax, masked sums for [p_y, 1 − p_y], log; NCKD from a softmax of
    all classes after subtracting 1000 from the tempered target logit; summed KLs divided by the batch."""

    def reference(ls, lt, y, alpha, beta, temp):
        b = ls.shape[0]
        gt = torch.zeros_like(ls).scatter_(1, y[:, None], 1.0)
        ps, pt = torch.softmax(ls / temp, 1), torch.softmax(lt / temp, 1)
        bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
        bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
        tckd = torch.sum(bt * (torch.log(bt) - torch.log(bs))) * temp**2 / b
        qt = torch.softmax(lt / temp - 1000.0 * gt, 1)
        log_qs = torch.log_softmax(ls / temp - 1000.0 * gt, 1)
        # 0 · log 0 = 0 where the teacher's masked probability underflows (as kl_div's xlogy)
        kl = torch.where(qt > 0, qt * (torch.log(qt) - log_qs), torch.zeros_like(qt))
        nckd = kl.sum() * temp**2 / b
        return alpha * tckd + beta * nckd

    g = torch.Generator().manual_seed(0)
    for b, k, temp, beta, scale in [(16, 10, 4.0, 8.0, 3.0), (7, 100, 4.0, 2.0, 5.0), (5, 6, 1.0, 0.5, 1.0)]:
        s = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
        t = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
        y = torch.randint(0, k, (b,), generator=g)
        want = reference(s, t, y, 1.0, beta, temp)
        assert dkd_loss(s, t, y, 1.0, beta, temp).item() == pytest.approx(want.item(), rel=1e-10)
        # with LS: the reference standardises (unbiased std, 1e-7 on the std) before its dkd_loss
        z = lambda v: (v - v.mean(1, keepdim=True)) / (1e-7 + v.std(1, keepdim=True))  # noqa: E731
        want_ls = reference(z(s), z(t), y, 9.0, 9.0 * beta, 2.0)
        got_ls = dkd_loss(s, t, y, 9.0, 9.0 * beta, 2.0, standardize=True)
        assert got_ls.item() == pytest.approx(want_ls.item(), rel=1e-10)


# -- invariances -----------------------------------------------------------------------------------------
def test_identical_logits_give_zero():
    z = torch.randn(6, 10) * 4
    y = torch.arange(6)
    for standardize in (False, True):
        tckd, nckd = dkd_terms(z, z.clone(), y, 4.0, standardize=standardize)
        assert tckd.item() == 0.0 and nckd.item() == 0.0
        assert kd_loss(z, z.clone(), 4.0, standardize=standardize).item() == 0.0
    # without LS only a constant shift per row keeps KD at zero
    shifted = z + torch.randn(6, 1)
    assert kd_loss(shifted, z, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_logit_standardization_is_invariant_to_positive_affine_maps():
    """``std(a·z + b) = a·std(z)`` and ``mean(a·z + b) = a·mean(z) + b`` for a > 0, so the z-score, and every
    loss computed on it, does not move (up to ε = 1e-7 against std of order 1); per-row a, b too."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 10, generator=g, dtype=torch.float64) * 2
    t = torch.randn(8, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    base_kd = kd_loss(s, t, 2.0, standardize=True).item()
    base_dkd = dkd_loss(s, t, y, 9.0, 72.0, 2.0, standardize=True).item()
    a_row = torch.rand(8, 1, generator=g, dtype=torch.float64) * 5 + 0.2
    b_row = torch.randn(8, 1, generator=g, dtype=torch.float64) * 10
    for a, b in [(0.25, 3.0), (7.0, -12.0), (a_row, b_row)]:
        assert torch.allclose(standardize_logits(a * s + b), standardize_logits(s), atol=1e-6)
        for s2, t2 in [(a * s + b, t), (s, a * t + b), (a * s + b, a * t - b)]:
            assert kd_loss(s2, t2, 2.0, standardize=True).item() == pytest.approx(base_kd, rel=1e-6)
            got = dkd_loss(s2, t2, y, 9.0, 72.0, 2.0, standardize=True).item()
            assert got == pytest.approx(base_dkd, rel=1e-6)
    # a student that is a positive affine map of the teacher is a perfect match under LS, not without it
    assert kd_loss(3.0 * t + 1.0, t, 2.0, standardize=True).item() == pytest.approx(0.0, abs=1e-9)
    assert kd_loss(3.0 * t + 1.0, t, 2.0).item() > 0.1
    # and a negative scale is not an invariance (the order of the classes flips)
    assert kd_loss(-s, s, 2.0, standardize=True).item() > 0.1


def test_constant_rows_standardize_to_zero_with_finite_gradients():
    z = torch.full((2, 5), 3.0, requires_grad=True)
    out = standardize_logits(z)
    assert torch.equal(out, torch.zeros(2, 5))
    kd_loss(z, torch.randn(2, 5), 2.0, standardize=True).backward()
    assert torch.isfinite(z.grad).all()


def test_bf16_logits_are_computed_in_float32():
    s, t, y = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16(), torch.arange(4)
    tckd, nckd = dkd_terms(s, t, y, 4.0, standardize=True)
    assert tckd.dtype == nckd.dtype == torch.float32 and torch.isfinite(tckd + nckd)
    assert kd_loss(s, t, 2.0, standardize=True).dtype == torch.float32


# -- gradients ---------------------------------------------------------------------------------------------
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2])
    assert torch.autograd.gradcheck(standardize_logits, (s,))
    for ls in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, ls=ls: kd_loss(a, b, 2.0, standardize=ls), (s, t))
        assert torch.autograd.gradcheck(lambda a, b, ls=ls: dkd_terms(a, b, y, 4.0, standardize=ls), (s, t))


# -- options and registration -------------------------------------------------------------------------------
def test_registered_names_and_defaults():
    names = set(available())
    assert {"kd", "kd+ls", "dkd", "dkd+ls"} <= names
    kd, kd_ls = get_method("kd").Options(), get_method("kd+ls").Options()
    assert kd.logit_standardize is False and (kd.ce_weight, kd.kd_weight, kd.temperature) == (0.1, 0.9, 4.0)
    assert kd_ls.logit_standardize is True
    assert (kd_ls.ce_weight, kd_ls.kd_weight, kd_ls.temperature) == (0.1, 9.0, 2.0)
    dkd, dkd_ls = get_method("dkd").Options(), get_method("dkd+ls").Options()
    assert dkd.model_dump() == {
        "ce_weight": 1.0,
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
        "warmup_epochs": 20,
        "logit_standardize": False,
    }
    assert dkd_ls.model_dump() == {
        "ce_weight": 1.0,
        "alpha": 9.0,
        "beta": 72.0,
        "temperature": 2.0,
        "warmup_epochs": 20,
        "logit_standardize": True,
    }


def test_options_are_validated():
    with pytest.raises(ConfigError, match="unknown option of 'dkd'.*beta"):
        validate_options("dkd", {"betta": 2.0})
    with pytest.raises(ConfigError, match="temperature"):
        validate_options("dkd+ls", {"temperature": 0.0})
    with pytest.raises(ConfigError, match="warmup_epochs"):
        validate_options("dkd", {"warmup_epochs": -1})
    with pytest.raises(ConfigError, match="unknown option of 'kd\\+ls'"):
        validate_options("kd+ls", {"beta": 1.0})
    assert validate_options("kd", {"logit_standardize": True}).logit_standardize is True
    with pytest.raises(ConfigError):
        mimkd.build_distiller("dkd", nn.Identity(), nn.Identity(), torch.randn(2, 4), alpah=1.0)


def test_kd_option_standardizes_only_the_kd_term():
    d, x = _fixed_pair(S, T, "kd", logit_standardize=True, temperature=2.0, kd_weight=9.0)
    terms = d(x, torch.tensor(Y), None)[1]
    assert terms["ce"].item() == pytest.approx(0.1 * np_ce(S, Y), rel=1e-5)  # CE on the raw logits
    want = 9.0 * np_kd(np_standardize(S), np_standardize(T), 2.0)
    assert terms["kd"].item() == pytest.approx(want, rel=1e-5)
    d_ls, _ = _fixed_pair(S, T, "kd+ls")
    assert {k: v.item() for k, v in d_ls(x, torch.tensor(Y), None)[1].items()} == pytest.approx(
        {k: v.item() for k, v in terms.items()}
    )


# -- real steps on zoo pairs ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dkd", "dkd+ls", "kd+ls"])
@pytest.mark.parametrize(("student", "teacher"), [("resnet8", "resnet14"), ("resnet8", "vgg8")])
def test_optimisation_steps_on_zoo_pairs(method, student, teacher):
    torch.manual_seed(0)
    s_net, t_net = build_network(student, 10, 3), build_network(teacher, 10, 3)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    d = mimkd.build_distiller(method, s_net, t_net, x, num_classes=10)
    before = [p.detach().clone() for p in s_net.parameters()]
    # plain SGD, a small step: dkd+ls's weights (α = 9, β = 72) make its first loss ~100 on random nets
    opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.002)
    step = TrainStep(d.train(), opt)
    ctx = StepContext(stage="main", epoch=25, step=0, steps_per_epoch=1, epochs=30)  # past the warm-up
    totals = []
    for _ in range(4):
        r = step(x, y, torch.arange(8), context=ctx)
        assert r.applied is True and all(torch.isfinite(v) for v in r.terms.values()), r.terms
        totals.append(r.total.item())
    want = {"ce", "tckd", "nckd"} if method.startswith("dkd") else {"ce", "kd"}
    assert set(r.terms) == want
    assert totals[-1] < totals[0], totals
    assert any(not torch.equal(a, p) for a, p in zip(before, s_net.parameters()))
    assert all(p.grad is None for p in t_net.parameters())
