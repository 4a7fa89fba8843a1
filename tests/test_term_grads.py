"""Per-term gradient diagnostics (``train.log_term_grads``): statistics, a real run, training unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mimkd.config import build_config
from mimkd.engine.setup import run
from mimkd.engine.term_grads import TermGradients, term_gradient_stats
from mimkd.experiments.grad_plots import plot_term_gradients

from helpers import needs_fmnist, run_cli


def _net_and_terms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    logits = net(x)
    ce = nn.functional.cross_entropy(logits, y)
    return net, logits, y, ce


def test_statistics_against_hand_computed_gradients():
    net, logits, y, ce = _net_and_terms()
    params = list(net.parameters())
    other = (logits**2).mean()
    terms = {"ce": ce, "sq": 0.5 * other, "zero": 0.0 * other, "neg": -2.0 * ce}
    stats = term_gradient_stats(terms, params, ce)
    g_ce = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce, params, retain_graph=True)])
    g_sq = torch.cat([g.reshape(-1) for g in torch.autograd.grad(0.5 * other, params, retain_graph=True)])
    assert stats["grad.ce.norm"] == pytest.approx(float(g_ce.norm()), rel=1e-5)
    assert stats["grad.ce.cos_ce"] == pytest.approx(1.0, abs=1e-6)  # CE with itself
    assert stats["grad.ce.ratio_ce"] == pytest.approx(1.0, abs=1e-6)
    assert stats["grad.sq.ratio_ce"] == pytest.approx(float(g_sq.norm() / g_ce.norm()), rel=1e-5)
    cos = float(g_sq @ g_ce / (g_sq.norm() * g_ce.norm()))
    assert stats["grad.sq.cos_ce"] == pytest.approx(cos, abs=1e-5)
    assert float(stats["grad.zero.norm"]) == 0.0  # a zero-weight term sends nothing
    assert float(stats["grad.zero.cos_ce"]) == 0.0
    assert stats["grad.neg.cos_ce"] == pytest.approx(-1.0, abs=1e-5)
    assert stats["grad.neg.ratio_ce"] == pytest.approx(2.0, rel=1e-5)
    total = g_ce + g_sq - 2.0 * g_ce
    assert stats["grad.total.norm"] == pytest.approx(float(total.norm()), rel=1e-5)
    assert "grad.ce_unweighted.norm" not in stats


def test_without_a_ce_term_the_unweighted_cross_entropy_is_the_reference():
    net, logits, y, ce = _net_and_terms()
    probe = TermGradients(net)
    stats = probe(logits, y, {"kd": (logits**2).mean()})
    g_ce = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(ce, list(net.parameters()), retain_graph=True)]
    )
    assert stats["grad.ce_unweighted.norm"] == pytest.approx(float(g_ce.norm()), rel=1e-5)
    assert math.isfinite(float(stats["grad.kd.ratio_ce"]))


def _cfg(tiny_teacher, tmp_path, name: str, every: int, method: dict):
    return build_config(
        {
            "seed": 5,
            "threads": 1,
            "out_dir": str(tmp_path),
            "name": name,
            "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.05},
            "student": {"arch": "conv4mp_w32"},
            "teacher": {"arch": "cnn_teacher", "checkpoint": str(tiny_teacher)},
            "method": method,
            "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05},
            "train": {"progress": False, "eval_teacher": False, "log_term_grads": every},
        }
    )


MIMKD = {"name": "mimkd", "critic_width": 16, "num_negatives": 64}


@needs_fmnist
def test_a_real_run_logs_every_term_and_trains_exactly_as_without(tiny_teacher, tmp_path):
    run(_cfg(tiny_teacher, tmp_path, "plain", 0, MIMKD))
    run(_cfg(tiny_teacher, tmp_path, "probed", 3, MIMKD))
    recs = [json.loads(x) for x in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        for term in ("ce", "mi_global", "mi_local", "mi_feature"):
            for stat in ("norm", "ratio_ce", "cos_ce"):
                assert math.isfinite(rec[f"grad.{term}.{stat}"]), (term, stat)
        assert rec["grad.ce.cos_ce"] == pytest.approx(1.0, abs=1e-5)
        assert rec["grad.mi_global.norm"] > 0 and rec["grad.total.norm"] > 0
    plain = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("grad.") for k in plain[0])
    a = torch.load(tmp_path / "plain" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "probed" / "last.pt", map_location="cpu", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k}: the diagnostics changed the training"
    events = list((tmp_path / "probed" / "tb").glob("events.*"))
    assert events, "no TensorBoard events"
    # mimkd report RUN_DIR: the run's curves and a table of the diagnostics
    out = run_cli("report", str(tmp_path / "probed")).stdout
    assert "| mi_global |" in out and "| mi_feature |" in out and "ratio / cos" in out
    assert (tmp_path / "probed" / "curves.png").stat().st_size > 10_000
    fig = plot_term_gradients(
        {"probed": [tmp_path / "probed"], "plain": [tmp_path / "plain"]}, tmp_path / "g.png", "t"
    )
    assert fig is not None and fig.stat().st_size > 10_000
    assert plot_term_gradients({"plain": [tmp_path / "plain"]}, tmp_path / "none.png", "t") is None


@needs_fmnist
def test_kd_run_logs_its_terms(tiny_teacher, tmp_path):
    run(_cfg(tiny_teacher, tmp_path, "kd", 1, {"name": "kd"}))
    rec = json.loads((tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["grad.kd.norm"] > 0 and -1.0 <= rec["grad.kd.cos_ce"] <= 1.0
    # KD's gradient on the student: 0.9 KD at T=4 (scaled by T^2) is many times 0.1 CE's
    assert rec["grad.kd.ratio_ce"] > 1.0
