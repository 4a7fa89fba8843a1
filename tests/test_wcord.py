"""WCoRD (docs/methods/wcord.md): Sinkhorn plans, LCKT's zero-cost oracle, GCKT golden values, spectral
norm, real steps, CLI."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import mimkd
from mimkd.distillers.wcord import (
    WassersteinBankContrast,
    WCoRD,
    WCoRDKD,
    cosine_cost,
    gckt_loss,
    lckt_loss,
)
from mimkd.errors import CheckpointError, ConfigError, MethodError
from mimkd.mi.sinkhorn import sinkhorn_log, sinkhorn_pot
from mimkd.models import build_model

TAU = 0.07
N_TRAIN = 200


def _distiller(method="wcord", **opts):
    torch.manual_seed(0)
    t, s = build_model("resnet20", num_classes=10), build_model("resnet8", num_classes=10)
    opts = {"num_negatives": 64, **opts}
    labels = torch.arange(N_TRAIN) % 10
    return mimkd.build_distiller(
        method, s, t, torch.randn(2, 3, 32, 32), num_classes=10, train_labels=labels, **opts
    )


# ------------------------------------------------------------------------------------------------ Sinkhorn
def test_sinkhorn_marginals_uniform_and_given():
    g = torch.Generator().manual_seed(0)
    for n, m in [(64, 64), (64, 48), (7, 5)]:
        plan = sinkhorn_log(2 * torch.rand(n, m, generator=g), eps=0.05, iters=200)
        assert plan.shape == (n, m) and bool((plan >= 0).all())
        torch.testing.assert_close(plan.sum(1), torch.full((n,), 1 / n), atol=1e-4, rtol=0)
        torch.testing.assert_close(plan.sum(0), torch.full((m,), 1 / m), atol=1e-4, rtol=0)
    # the default setting (ε = 0.05, 50 iterations: docs/methods/wcord.md), embeddings aligned
    t = F.normalize(torch.randn(64, 128, generator=g), dim=1)
    s = F.normalize(t + 0.1 * torch.randn(64, 128, generator=g), dim=1)
    plan = sinkhorn_log(cosine_cost(t, s))
    torch.testing.assert_close(plan.sum(1), torch.full((64,), 1 / 64), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((64,), 1 / 64), atol=1e-4, rtol=0)
    # a separable cost C_ij = f_i + g_j: the plan is the independent coupling a·bᵀ, for any ε
    a, b = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.1, 0.9], dtype=torch.float64)
    cost = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)[:, None] + torch.tensor([0.3, 0.0])[None, :]
    torch.testing.assert_close(sinkhorn_log(cost, 0.05, 50, a, b), a[:, None] * b[None, :])
    # a batch of costs is solved independently
    costs = 2 * torch.rand(3, 6, 4, generator=g)
    torch.testing.assert_close(sinkhorn_log(costs), torch.stack([sinkhorn_log(c) for c in costs]))


@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_sinkhorn_two_by_two_closed_form(eps):
    # C = [[0, 1], [1, 0]], uniform marginals: π11 = π22 = 1 / (2(1 + e^{−1/ε})), π12 = π21 = 1/2 − π11
    plan = sinkhorn_log(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), eps, 50)
    x = 1.0 / (2.0 * (1.0 + math.exp(-1.0 / eps)))
    torch.testing.assert_close(plan, torch.tensor([[x, 0.5 - x], [0.5 - x, x]], dtype=torch.float64))


def test_sinkhorn_small_eps_approaches_the_optimal_assignment():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows, cols = scipy_optimize.linear_sum_assignment(cost.numpy())
    best = torch.zeros(6, 6, dtype=torch.float64)
    best[rows, cols] = 1 / 6
    plan = sinkhorn_log(cost, eps=0.005, iters=5000)
    assert float((plan - best).abs().max()) < 1e-3
    assert float((plan * cost).sum()) == pytest.approx(float((best * cost).sum()), abs=1e-3)


def test_sinkhorn_errors_and_pot():
    with pytest.raises(MethodError, match="eps"):
        sinkhorn_log(torch.rand(3, 3), eps=0.0)
    with pytest.raises(MethodError, match="cost"):
        sinkhorn_log(torch.rand(3))
    with pytest.raises(MethodError, match="positive weights"):
        sinkhorn_log(torch.rand(3, 2), a=torch.tensor([0.5, 0.5]))
    try:
        import ot
    except ImportError:
        ot = None
    if ot is not None:  # POT installed (the benchmark's environment): the same updates give the same plan
        cost = 2 * torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(sinkhorn_pot(cost), sinkhorn_log(cost))


def test_sinkhorn_pot_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # makes `import ot` raise ImportError
    with pytest.raises(MethodError, match="pip install pot"):
        sinkhorn_pot(torch.rand(4, 4))


# -------------------------------------------------------------------------------------------------- LCKT
def test_lckt_identical_features_cost_zero_for_any_plan():
    """All features identical → cost matrix 0 → loss 0 for any plan."""
    h = torch.randn(1, 128).expand(8, 128)
    cost = cosine_cost(h, 3.0 * h)
    assert float(cost.abs().max()) < 1e-6
    plan = torch.rand(8, 8)
    assert float((plan / plan.sum() * cost).sum()) == pytest.approx(0.0, abs=1e-6)
    loss, _ = lckt_loss(h, h)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_lckt_plan_is_a_constant_and_gradients_flow_through_the_cost():
    g = torch.Generator().manual_seed(0)
    h_t = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    h_s = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    loss, plan = lckt_loss(h_t, h_s)
    assert not plan.requires_grad and plan.grad_fn is None
    torch.testing.assert_close(plan, sinkhorn_log(cosine_cost(h_t, h_s).detach()))
    grads = torch.autograd.grad(loss, [h_t, h_s])
    manual = (plan * cosine_cost(h_t, h_s)).sum()  # the same sum with the plan held fixed
    torch.testing.assert_close(grads, torch.autograd.grad(manual, [h_t, h_s]))
    # permuted identical embeddings: the plan finds the matching, the OT cost is near 0
    z = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    loss, plan = lckt_loss(z, z[torch.randperm(8, generator=g)], eps=0.05, iters=50)
    assert float(loss) < 0.05
    assert float(plan.max(dim=1).values.sum()) > 0.95


# -------------------------------------------------------------------------------------------------- GCKT
def test_gckt_loss_values():
    assert float(gckt_loss(torch.full((4,), 3.0), torch.full((4, 9), 3.0))) == 0.0
    assert float(gckt_loss(torch.tensor([2.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))) == -1.0
    with pytest.raises(MethodError, match="pos"):
        gckt_loss(torch.zeros(3), torch.zeros(2, 4))


def test_gckt_golden_values_on_a_hand_made_bank():
    # N = 4, classes [0, 1, 0, 1], K = 2: the negatives of sample 0 are exactly {1, 3}
    c = WassersteinBankContrast(torch.tensor([0, 1, 0, 1]), dim=2, num_negatives=2, temperature=TAU)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # positive rows equal to the anchor, negatives orthogonal: each direction −(1/τ − 0)
    c.bank_teacher.memory.copy_(torch.stack([e1, e2, e1, e2]))
    c.bank_student.memory.copy_(torch.stack([e2, e1, e2, e1]))
    loss, est = c(e1[None], e2[None], torch.tensor([0]))
    assert float(loss) == pytest.approx(-2.0 / TAU, abs=1e-5)
    assert float(est) == pytest.approx(1.0 / TAU, abs=1e-5)
    # momentum update of the touched row (m = 0.5), re-normalised; the others untouched
    torch.testing.assert_close(c.bank_teacher.memory[0], F.normalize(0.5 * e1 + 0.5 * e2, dim=0))
    torch.testing.assert_close(c.bank_teacher.memory[1:], torch.stack([e2, e1, e2]))
    # all bank rows equal: joint and marginal terms coincide, the dual is 0
    c.bank_teacher.memory.copy_(F.normalize(torch.ones(4, 2), dim=1))
    c.bank_student.memory.copy_(torch.tensor([0.6, 0.8]).expand(4, 2))
    loss, est = c(
        F.normalize(torch.randn(1, 2), dim=1), F.normalize(torch.randn(1, 2), dim=1), torch.tensor([2])
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-5) and float(est) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(MethodError, match="index"):
        c(e1[None], e2[None], None)


# --------------------------------------------------------------------------------------------- distiller
def test_options_defaults_and_errors():
    d = _distiller()
    o = d.options
    assert isinstance(d, WCoRD) and not isinstance(d, WCoRDKD)
    assert (o.ce_weight, o.kd_weight, o.weight, o.gckt_weight, o.lckt_weight) == (1.0, 0.0, 1.0, 0.8, 0.1)
    assert (o.feat_dim, o.temperature, o.momentum, o.lipschitz) == (128, 0.07, 0.5, "spectral_norm")
    assert (o.sinkhorn, o.sinkhorn_epsilon, o.sinkhorn_iters, o.kd_temperature) == (
        "log_domain",
        0.05,
        50,
        4.0,
    )
    assert mimkd.distillers.get_method("wcord").Options().num_negatives == 16384
    dk = _distiller("wcord+kd")
    assert isinstance(dk, WCoRDKD) and dk.options.kd_weight == 1.0
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    _, terms = dk(x, y, torch.arange(4))
    assert set(terms) == {"ce", "kd", "gckt", "lckt"}
    with pytest.raises(MethodError, match="index"):
        d(x, y, None)
    with pytest.raises(MethodError, match="train_labels"):
        mimkd.build_distiller(
            "wcord", build_model("resnet8"), build_model("resnet20"), torch.randn(2, 3, 32, 32)
        )
    with pytest.raises(ConfigError, match="lipschitz"):
        _distiller(lipschitz="gradient_penalty")
    # λ1 = 0: no GCKT term, the banks are neither read nor written; λ2 = 0: no LCKT term
    d0 = _distiller(gckt_weight=0.0)
    before = d0.contrast.bank_student.memory.clone()
    _, terms = d0(x, y, None)
    assert set(terms) == {"ce", "lckt"} and torch.equal(d0.contrast.bank_student.memory, before)
    assert set(_distiller(lckt_weight=0.0)(x, y, torch.arange(4))[1]) == {"ce", "gckt"}


def test_term_weights_and_metrics():
    d = _distiller(weight=2.0, gckt_weight=0.5, lckt_weight=0.25).train()
    _, terms = d(torch.randn(4, 3, 32, 32), torch.arange(4), torch.arange(4))
    assert set(d.metrics) == {"w_dual", "ot_cost"}
    lckt, gckt = float(terms["lckt"].detach()), float(terms["gckt"].detach())
    assert lckt == pytest.approx(2.0 * 0.25 * float(d.metrics["ot_cost"]), rel=1e-6)
    assert gckt == pytest.approx(2.0 * 0.5 * -2.0 * float(d.metrics["w_dual"]), rel=1e-5)
    assert abs(float(d.metrics["w_dual"])) <= 2.0 / TAU and 0.0 <= float(d.metrics["ot_cost"]) <= 2.0


def test_spectral_norm_bounds_the_heads():
    def sigma(head):  # in train mode every access to the weight runs one power iteration
        return float(torch.linalg.matrix_norm(head.linear.weight.detach(), ord=2))

    d = _distiller().train()
    heads = (d.embed_s, d.embed_t)
    for head in heads:
        assert torch.nn.utils.parametrize.is_parametrized(head.linear, "weight")
        assert sigma(head) == pytest.approx(1.0, abs=0.03)  # 15 power iterations at registration
    opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.05, momentum=0.9)
    for step in range(3):  # one power iteration per step tracks the moving weight
        _, terms = d(torch.randn(8, 3, 32, 32), torch.arange(8) % 10, torch.arange(8) + 8 * step)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        assert all(sigma(head) <= 1.15 for head in heads)
    for head in heads:
        for _ in range(30):
            sigma(head)
        assert sigma(head) == pytest.approx(1.0, abs=1e-3)
    plain = _distiller(lipschitz="none")
    assert not torch.nn.utils.parametrize.is_parametrized(plain.embed_s.linear)


@pytest.mark.parametrize("method", ["wcord", "wcord+kd"])
def test_one_real_step(method):
    d = _distiller(method).train()
    assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())
    opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.01, momentum=0.9)
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.student.named_parameters()}
    banks = [d.contrast.bank_student, d.contrast.bank_teacher]
    banks_before = [b.memory.clone() for b in banks]
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(N_TRAIN, generator=g)[:8]
    x, y = torch.randn(8, 3, 32, 32, generator=g), index % 10
    _, terms = d(x, y, index)
    assert set(terms) == ({"ce", "gckt", "lckt", "kd"} if method == "wcord+kd" else {"ce", "gckt", "lckt"})
    assert all(torch.isfinite(v) for v in terms.values())
    opt.zero_grad(set_to_none=True)
    terms["lckt"].backward(retain_graph=True)  # LCKT: over θ_S only (teacher embedding detached)
    assert all(p.grad is None for p in d.embed_t.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.embed_s.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    opt.zero_grad(set_to_none=True)
    terms["gckt"].backward(retain_graph=True)  # GCKT reaches the student and both heads
    for head in (d.embed_s, d.embed_t):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    opt.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    opt.step()
    assert any(not torch.equal(p, student_before[n]) for n, p in d.student.named_parameters())
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    for before, bank in zip(banks_before, banks):
        changed = (bank.memory != before).any(dim=1)
        assert torch.equal(changed.nonzero().flatten(), index.sort().values)
        torch.testing.assert_close(bank.memory[index].norm(dim=1), torch.ones(8))


def test_method_state_round_trip():
    d = _distiller().train()
    for step in range(2):
        _, terms = d(torch.randn(8, 3, 32, 32), torch.arange(8), torch.arange(8) + 8 * step)
        sum(terms.values()).backward()
    buf = io.BytesIO()
    torch.save(d.method_state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert any(k.endswith("_u") for k in state) and "contrast.bank_teacher.memory" in state
    fresh = _distiller()
    fresh.load_method_state_dict(state)
    for k, v in d.method_state_dict().items():
        assert torch.equal(fresh.method_state_dict()[k], v), k
    d.eval()
    fresh.eval()
    h = torch.randn(3, 64)
    torch.testing.assert_close(fresh.embed_s(h), d.embed_s(h))
    with pytest.raises(CheckpointError):
        _distiller(lipschitz="none").load_method_state_dict(state)


def test_cli_distill_wcord_end_to_end(tiny_teacher, tmp_path):
    from helpers import SMALL_RUN, run_cli

    run_cli(
        "distill", "--teacher", str(tiny_teacher), "--student", "conv4mp_w32", "--method", "wcord",
        *SMALL_RUN, "--epochs", "1", "--set", "method.num_negatives=256",
        "--out", str(tmp_path), "--name", "r",
    )  # fmt: skip
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["method"] == "wcord"
    assert summary["last"]["top1"] > 20.0
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    main = [r for r in recs if "test.top1" in r]
    assert len(main) == 1
    assert main[0]["loss.lckt"] > 0 and math.isfinite(main[0]["loss.gckt"])
    assert "metric.w_dual" in main[0] and "metric.ot_cost" in main[0]
