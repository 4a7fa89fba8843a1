"""Critics and in-batch negatives (docs/mimkd.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimkd.errors import MethodError
from mimkd.mi import ConcatConvCritic, ProjectDotCritic, ProjectionHead, derangement
from mimkd.mi.negatives import all_pairs_negatives, roll_derangement


# ------------------------------------------------------------------------------------------------ negatives
@pytest.mark.parametrize("fn", [derangement, roll_derangement])
def test_derangements_have_no_fixed_point(fn):
    g = torch.Generator().manual_seed(0)
    for b in (2, 3, 5, 64):
        for _ in range(20):
            perm = fn(b, generator=g)
            assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(b))
            assert not bool((perm == torch.arange(b)).any())


@pytest.mark.parametrize("fn", [derangement, roll_derangement, all_pairs_negatives])
def test_batch_of_one_raises(fn):
    with pytest.raises(MethodError, match="at least 2"):
        fn(1)


def test_derangement_is_uniform_over_derangements():
    # B = 4 has 9 derangements; each should come up about 1/9 of the time
    g = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    draws = 4500
    for _ in range(draws):
        key = tuple(derangement(4, generator=g).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 9
    expected = draws / 9
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 26.1  # 8 degrees of freedom, p = 0.001


def test_derangement_seeded_and_device():
    a = derangement(16, generator=torch.Generator().manual_seed(3), device="cpu")
    b = derangement(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_all_pairs_negatives():
    idx = all_pairs_negatives(4)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


# ------------------------------------------------------------------------------------------ concat critic
def naive_scores(critic: ConcatConvCritic, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The plain definition: replicate a vector teacher, concatenate on channels, run the conv stack."""
    if t.dim() == 2:
        t = t[:, :, None, None].expand(-1, -1, *s.shape[2:])
    h = torch.cat([t, s], dim=1)
    for conv in critic.layers[:-1]:
        h = F.relu(conv(h))
    return critic.layers[-1](h)


def test_concat_critic_structure_and_shape():
    critic = ConcatConvCritic(6, 4, hidden=16)
    convs = list(critic.layers)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (10, 16, (1, 1)),
        (16, 16, (1, 1)),
        (16, 1, (1, 1)),
    ]
    assert all(c.bias is not None for c in convs)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    assert set(critic.state_dict()) == {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    s = torch.randn(3, 4, 5, 5)
    assert critic(torch.randn(3, 6, 5, 5), s).shape == (3, 1, 5, 5)
    assert critic(torch.randn(3, 6), s).shape == (3, 1, 5, 5)
    assert len(ConcatConvCritic(6, 4, hidden=8, num_hidden_layers=3).layers) == 4


@pytest.mark.parametrize("teacher", ["map", "vector"])
def test_concat_critic_forward_matches_naive(teacher):
    torch.manual_seed(0)
    critic = ConcatConvCritic(6, 4, hidden=32)
    s = torch.randn(5, 4, 3, 3)
    t = torch.randn(5, 6, 3, 3) if teacher == "map" else torch.randn(5, 6)
    assert torch.allclose(critic(t, s), naive_scores(critic, t, s), atol=1e-5)


@pytest.mark.parametrize("teacher", ["map", "vector"])
def test_pair_scores_match_naive_values_and_gradients(teacher):
    torch.manual_seed(0)
    critic = ConcatConvCritic(6, 4, hidden=32)
    s = torch.randn(5, 4, 3, 3, requires_grad=True)
    t = torch.randn(5, 6, 3, 3) if teacher == "map" else torch.randn(5, 6)
    t.requires_grad_(True)
    perm = derangement(5, generator=torch.Generator().manual_seed(1))

    pos, neg = critic.pair_scores(t, s, perm)
    assert pos.shape == neg.shape == (5, 1, 3, 3)
    weights = torch.randn(2, 5, 1, 3, 3)
    loss = (pos * weights[0]).sum() + (neg * weights[1]).sum()
    grads = torch.autograd.grad(loss, [t, s, *critic.parameters()])

    ref_pos = naive_scores(critic, t, s)
    ref_neg = naive_scores(critic, t[perm], s)
    assert torch.allclose(pos, ref_pos, atol=1e-5) and torch.allclose(neg, ref_neg, atol=1e-5)
    ref_loss = (ref_pos * weights[0]).sum() + (ref_neg * weights[1]).sum()
    ref_grads = torch.autograd.grad(ref_loss, [t, s, *critic.parameters()])
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)


def test_pair_scores_with_several_negatives_per_positive():
    torch.manual_seed(0)
    critic = ConcatConvCritic(3, 2, hidden=8)
    t, s = torch.randn(4, 3), torch.randn(4, 2, 2, 2)
    pos, neg = critic.pair_scores(t, s, all_pairs_negatives(4))
    assert pos.shape == (4, 1, 2, 2) and neg.shape == (4, 3, 1, 2, 2)
    for b in range(4):
        for j, other in enumerate(all_pairs_negatives(4)[b].tolist()):
            assert torch.allclose(
                neg[b, j], naive_scores(critic, t[other : other + 1], s[b : b + 1])[0], atol=1e-5
            )


def test_concat_critic_zero_last_layer_gives_jsd_log4():
    from mimkd.mi import jsd_bound

    critic = ConcatConvCritic(3, 2, hidden=8)
    torch.nn.init.zeros_(critic.layers[-1].weight)
    torch.nn.init.zeros_(critic.layers[-1].bias)
    pos, neg = critic.pair_scores(torch.randn(4, 3, 2, 2), torch.randn(4, 2, 2, 2), derangement(4))
    assert abs(float(jsd_bound(pos, neg).detach()) + 1.3862944) < 1e-6


def test_concat_critic_input_validation():
    critic = ConcatConvCritic(6, 4, hidden=8)
    with pytest.raises(MethodError, match="teacher"):
        critic(torch.randn(2, 5, 3, 3), torch.randn(2, 4, 3, 3))
    with pytest.raises(MethodError, match="student"):
        critic(torch.randn(2, 6), torch.randn(2, 3, 3, 3))
    with pytest.raises(MethodError, match="spatial"):
        critic(torch.randn(2, 6, 4, 4), torch.randn(2, 4, 3, 3))
    with pytest.raises(MethodError, match="perm"):
        critic.pair_scores(torch.randn(2, 6), torch.randn(2, 4, 3, 3), torch.tensor([1, 0, 2]))
    with pytest.raises(MethodError, match="at least 2"):
        critic.pair_scores(torch.randn(1, 6), torch.randn(1, 4, 3, 3), derangement(1))


# ------------------------------------------------------------------------------------------ projection head
def test_projection_head_shortcut_init_identity_diagonal():
    head = ProjectionHead(16, 32)
    w = head.shortcut.weight.detach()
    assert torch.equal(w.diagonal(), torch.ones(16))
    off = w.clone()
    off[range(16), range(16)] = 0
    assert float(off.abs().max()) <= 0.01
    assert head.shortcut.bias is not None and head.block[0].bias is None
    assert isinstance(head.block[1], torch.nn.BatchNorm1d)


def test_projection_head_default_init_when_narrowing():
    torch.manual_seed(0)
    head = ProjectionHead(256, 32)
    w = head.shortcut.weight.detach()
    assert not torch.allclose(w.diagonal(), torch.ones(32))
    assert float(w.abs().max()) <= 1 / 256**0.5 + 1e-6  # PyTorch's default kaiming-uniform bound


def test_projection_head_formula():
    torch.manual_seed(0)
    head = ProjectionHead(8, 12).eval()
    x = torch.randn(5, 8)
    lin1, bn, _, lin2 = head.block
    expected = lin2(F.relu(bn(x @ lin1.weight.T))) + x @ head.shortcut.weight.T + head.shortcut.bias
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert head(x[:, :, None, None]).shape == (5, 12)


# --------------------------------------------------------------------------------------- project-dot critic
def test_project_dot_normalised_scores_bounded_by_inverse_temperature():
    torch.manual_seed(0)
    critic = ProjectDotCritic(20, 10, dim=16, temperature=0.07)
    f_t, f_s = torch.randn(8, 20) * 50, torch.randn(8, 10) * 50
    scores = critic(f_t, f_s)
    assert scores.shape == (8,)
    assert float(scores.detach().abs().max()) <= 1 / 0.07 + 1e-4
    e = critic.embed_teacher(f_t)
    assert torch.allclose(e.norm(dim=1), torch.ones(8), atol=1e-5)
    # a vector scored against itself reaches the bound
    assert torch.allclose(critic.score(e, e), torch.full((8,), 1 / 0.07), atol=1e-4)


def test_project_dot_raw_variant_and_pair_scores():
    torch.manual_seed(0)
    critic = ProjectDotCritic(6, 5, dim=8, normalize=False)
    f_t, f_s = torch.randn(4, 6), torch.randn(4, 5)
    a, b = critic.embed_teacher(f_t), critic.embed_student(f_s)
    assert torch.allclose(critic(f_t, f_s), (a * b).sum(1), atol=1e-6)
    perm = derangement(4)
    pos, neg = critic.pair_scores(f_t, f_s, perm)
    assert torch.allclose(pos, (a * b).sum(1), atol=1e-6)
    assert torch.allclose(neg, (a[perm] * b).sum(1), atol=1e-6)
    _, neg_all = critic.pair_scores(f_t, f_s, all_pairs_negatives(4))
    assert neg_all.shape == (4, 3)
    assert torch.allclose(neg_all, (a @ b.T).T[torch.arange(4)[:, None], all_pairs_negatives(4)], atol=1e-5)


def test_project_dot_validation():
    with pytest.raises(MethodError, match="temperature"):
        ProjectDotCritic(4, 4, temperature=0.0)
    critic = ProjectDotCritic(4, 3, dim=8)
    with pytest.raises(MethodError, match="batch"):
        critic(torch.randn(3, 4), torch.randn(2, 3))
