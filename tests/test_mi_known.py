"""The library's MI bounds and critics on correlated Gaussians of known MI (small scale of
``benchmarks/bench_mi_estimators.py``, whose functions these tests import).

Each check trains a fresh critic for a few hundred steps on one CPU thread and evaluates its bound on fresh
held-out batches. The true-MI-0 check uses the concat critic: the separable ``ProjectDotCritic`` starts from
the score ``x·y`` (identity-initialised shortcut) and needs about a thousand steps to unlearn it, which the
benchmark shows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from mimkd.mi import all_pairs_negatives, derangement

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mi_estimators.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_mi_estimators", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
Estimator = bench.Estimator
SETTINGS = bench.Settings(steps=300, eval_batches=8, pool=4096, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def estimate(family: str, est: Estimator, mi: float, steps: int = 300) -> dict[str, dict[str, float]]:
    settings = dataclasses.replace(SETTINGS, steps=steps)
    critic, _ = bench.train_critic(family, est, mi, settings)
    return {
        k: {**bench.summarise(v), "values": v} for k, v in bench.evaluate(critic, est, mi, settings).items()
    }


# ----------------------------------------------------------------------------------------------- set-up
@pytest.mark.parametrize("mi", [0.0, 0.5, 2.0, 10.0, 12.0])
def test_rho_gives_the_requested_mi(mi):
    rho = bench.rho_for_mi(mi, 20)
    assert 0.0 <= rho < 1.0
    assert bench.true_mi(rho, 20) == pytest.approx(mi, abs=1e-9)


def test_samples_have_the_requested_correlation():
    rho = bench.rho_for_mi(4.0, 20)
    x, y = bench.sample_pairs(20000, 20, rho, torch.Generator().manual_seed(0))
    corr = ((x - x.mean(0)) * (y - y.mean(0))).mean(0) / (x.std(0) * y.std(0))
    assert torch.allclose(corr, torch.full((20,), rho), atol=0.02)
    assert torch.allclose(y.std(0), torch.ones(20), atol=0.03)


@pytest.mark.parametrize(("batch", "k"), [(16, None), (16, 5), (16, 15)])
def test_negatives_never_pair_a_sample_with_itself(batch, k):
    perm = bench.negatives(Estimator("x", "infonce", batch, k), torch.Generator().manual_seed(1))
    rows = torch.arange(batch)
    if k is None:
        assert perm.shape == (batch,) and not bool((perm == rows).any())
        return
    assert perm.shape == (batch, k)
    assert not bool((perm == rows[:, None]).any())
    assert all(len(set(row.tolist())) == k for row in perm)


def test_fast_paths_match_the_critics_own_pair_scores():
    torch.manual_seed(0)
    x, y = torch.randn(8, 20), torch.randn(8, 20)
    every = all_pairs_negatives(8)
    sep = bench.make_critic("separable", SETTINGS).eval()
    with torch.no_grad():
        pos, neg = bench.pair_scores(sep, x, y, every)
        ref_pos, ref_neg = sep.pair_scores(x, y, every)
        assert torch.allclose(pos, ref_pos, atol=1e-5) and torch.allclose(neg, ref_neg, atol=1e-5)
        concat = bench.make_critic("concat", SETTINGS)
        pos, neg = bench.pair_scores(concat, x, y, derangement(8))
        assert pos.shape == (8,) and neg.shape == (8,)
        assert torch.allclose(pos, bench.aligned_scores(concat, x, y), atol=1e-6)


def test_bounds_on_the_true_log_density_ratio():
    """The optimal critic ``T = log p/(pq)`` needs no training: each library bound behaves as theory says."""
    mi, d, batch = 10.0, 20, 4096
    rho = bench.rho_for_mi(mi, d)
    gen = torch.Generator().manual_seed(3)
    x, y = bench.sample_pairs(batch, d, rho, gen)
    pos = bench.log_density_ratio(x, y, rho)
    assert float(pos.mean()) == pytest.approx(mi, abs=0.3)  # E_p[log p/(pq)] is the MI
    oracle = OracleCritic(rho)
    assert bench.is_dv(oracle, pos, rho, SETTINGS, gen) == pytest.approx(float(pos.mean()), abs=0.05)
    perm = bench.negatives(Estimator("nce16", "infonce", batch, 15), gen)
    neg = bench.log_density_ratio(x[perm].reshape(-1, d), y.repeat_interleave(15, dim=0), rho).view(batch, 15)
    nce = float(bench.bound_of("infonce", pos, neg))
    assert math.log(16) - 0.05 < nce <= math.log(16) + 1e-6
    jsd = float(bench.bound_of("jsd", pos, neg[:, 0]))
    assert math.log(4) - 0.1 < jsd <= math.log(4)


class OracleCritic(torch.nn.Module):
    def __init__(self, rho: float) -> None:
        super().__init__()
        self.rho = rho

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return bench.log_density_ratio(x, y, self.rho)


# ------------------------------------------------------------------------------------------- estimators
def test_every_estimate_is_near_zero_at_zero_mi():
    for est in (Estimator("jsd", "jsd", 64, None), Estimator("nce16", "infonce", 64, 15)):
        for name, s in estimate("concat", est, 0.0, steps=150).items():
            assert abs(s["mean"]) < 0.05, (name, s["mean"])
    for name, s in estimate("concat", Estimator("dv", "dv", 64, 63), 0.0, steps=150).items():
        assert abs(s["mean"]) < 0.05, (name, s["mean"])


def test_infonce_saturates_at_log_k_plus_1():
    res = estimate("separable", Estimator("nce16", "infonce", 128, 15), 10.0)["nce16"]
    ceiling = math.log(16)
    assert max(res["values"]) <= ceiling + 1e-5  # a hard bound, whatever the critic
    assert res["mean"] >= ceiling - 0.15  # and reached: far below the true 10 nats
    assert res["mean"] < 10.0 - 7.0


def test_infonce_with_many_negatives_is_near_the_truth_at_2_nats():
    res = estimate("separable", Estimator("nce128", "infonce", 128, 127), 2.0)["nce128"]
    assert 2.0 - 0.4 < res["mean"] < 2.0 + 0.1


def test_jsd_trained_critic_orders_mi_levels():
    est = Estimator("jsd", "jsd", 128, None)
    low, high = estimate("separable", est, 2.0), estimate("separable", est, 6.0)
    assert high["jsd"]["mean"] > low["jsd"]["mean"] + 0.2
    assert max(high["jsd"]["values"]) <= math.log(4) + 1e-5  # the JSD value is not MI: capped at log 4
    assert high["jsd_dv"]["mean"] > low["jsd_dv"]["mean"] + 1.5
    assert high["jsd_dv_is"]["mean"] > low["jsd_dv_is"]["mean"] + 0.5
    assert high["jsd_nce128"]["mean"] > low["jsd_nce128"]["mean"] + 1.0


def test_dv_is_near_the_truth_at_2_nats():
    res = estimate("concat", Estimator("dv", "dv", 64, 63), 2.0)
    assert abs(res["dv"]["mean"] - 2.0) < 0.5
    assert abs(res["dv_pool"]["mean"] - 2.0) < 0.5
