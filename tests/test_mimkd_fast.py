"""MIMKD's opt-in fast path: the local and feature critics scored on a random subset of locations
(``critic_locations``, docs/methods/mimkd.md)."""

from __future__ import annotations

import pytest
import torch

import mimkd
from mimkd.errors import MethodError
from mimkd.mi.critics import ConcatConvCritic, sample_locations, sampled_pair_scores
from mimkd.mi.negatives import derangement
from mimkd.models import build_model


def _naive_scores(critic: ConcatConvCritic, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The critic as its paper describes it: the conv stack over the concatenation, B×1×h×w."""
    if t.dim() == 2:
        t = t[:, :, None, None].expand(-1, -1, *s.shape[2:])
    h = torch.cat([t, s], dim=1)
    for conv in critic.layers[:-1]:
        h = torch.relu(conv(h))
    return critic.layers[-1](h)


@pytest.mark.parametrize("teacher_is_map", [True, False])
def test_sampled_scores_equal_the_naive_critic_at_the_sampled_locations(teacher_is_map):
    torch.manual_seed(0)
    critic = ConcatConvCritic(6, 5, hidden=16, num_hidden_layers=2)
    b, side = 5, 4
    s = torch.randn(b, 5, side, side)
    t = torch.randn(b, 6, side, side) if teacher_is_map else torch.randn(b, 6)
    perm = derangement(b)
    where = sample_locations(b, side * side, 7, s.device)
    pos, neg = sampled_pair_scores(critic, t, s, perm, where)
    assert pos.shape == neg.shape == (b, 7)
    full_pos = _naive_scores(critic, t, s).flatten(1)
    full_neg = _naive_scores(critic, t[perm], s).flatten(1)
    torch.testing.assert_close(pos, full_pos.gather(1, where), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(neg, full_neg.gather(1, where), rtol=1e-5, atol=1e-6)


def test_sampled_locations_are_distinct_and_uniform():
    g = torch.Generator().manual_seed(1)
    where = sample_locations(4000, 10, 3, torch.device("cpu"), generator=g)
    assert where.shape == (4000, 3)
    assert (where.sort(dim=1).values.diff(dim=1) > 0).all()  # no repeats within an image
    counts = torch.bincount(where.flatten(), minlength=10).double()
    expected = 4000 * 3 / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def test_sampled_path_refuses_all_pairs_negatives():
    critic = ConcatConvCritic(3, 3, hidden=8)
    s = torch.randn(4, 3, 2, 2)
    with pytest.raises(MethodError, match="critic_locations"):
        sampled_pair_scores(critic, s, s, torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 1).long())


def _distiller(**opts):
    torch.manual_seed(0)
    t = build_model("resnet32x4", num_classes=100)
    s = build_model("resnet8x4", num_classes=100)
    labels = torch.arange(64) % 100
    return mimkd.build_distiller(
        "mimkd",
        s,
        t,
        torch.randn(2, 3, 32, 32),
        train_labels=labels,
        critic_width=32,
        num_negatives=16,
        **opts,
    )


def _terms(distiller, seed=3):
    torch.manual_seed(seed)
    x, y, idx = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)), torch.tensor([0, 5, 9, 33])
    torch.manual_seed(seed + 1)
    return distiller(x, y, idx)[1]


def test_all_locations_equal_full_mimkd_exactly():
    full, every = _distiller(), _distiller(critic_locations=32 * 32)
    every.load_state_dict(full.state_dict())
    a, b = _terms(full), _terms(every)
    assert set(a) == set(b) == {"ce", "mi_global", "mi_local", "mi_feature"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fast_path_trains_and_differs_from_full_with_few_locations():
    full, fast = _distiller(), _distiller(critic_locations=4)
    fast.load_state_dict(full.state_dict())
    a, b = _terms(full), _terms(fast)
    assert torch.equal(a["ce"], b["ce"])
    assert not torch.equal(a["mi_feature"], b["mi_feature"])
    params = [p for _, p in fast.trainable_named_parameters()]
    sum(b.values()).backward()
    grads = {n: p.grad for n, p in fast.trainable_named_parameters()}
    assert any(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("feature_critics")
    )
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("student."))
    assert len(params) == len(grads)
