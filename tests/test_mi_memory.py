"""CRD memory bank and class-aware negative sampling (docs/methods/crd.md)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from mimkd.errors import MethodError
from mimkd.mi import ClassAwareNegativeSampler, MemoryBank

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------------ the bank
def test_bank_init_range_and_buffer():
    bank = MemoryBank(2000, dim=12, generator=torch.Generator().manual_seed(0))
    a = 1 / math.sqrt(12 / 3)
    m = bank.memory
    assert m.shape == (2000, 12) and not m.requires_grad
    assert float(m.abs().max()) <= a and float(m.max()) > 0.95 * a and float(m.min()) < -0.95 * a
    assert abs(float(m.mean())) < 0.02
    assert not torch.allclose(m.norm(dim=1), torch.ones(2000))  # rows not normalised initially
    assert "memory" in bank.state_dict() and list(bank.parameters()) == []


def test_update_normalises_touched_rows_only():
    torch.manual_seed(0)
    bank = MemoryBank(50, dim=8, momentum=0.5)
    before = bank.memory.clone()
    idx = torch.tensor([3, 17, 42, 0])
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    bank.update(idx, z)
    after = bank.memory
    assert torch.allclose(after[idx].norm(dim=1), torch.ones(4), atol=1e-6)
    expected = torch.nn.functional.normalize(0.5 * before[idx] + 0.5 * z, dim=1)
    assert torch.allclose(after[idx], expected, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(after[untouched], before[untouched])


def test_update_duplicate_index_last_occurrence_wins():
    torch.manual_seed(0)
    bank = MemoryBank(10, dim=4)
    before = bank.memory.clone()
    z = torch.randn(3, 4)
    bank.update(torch.tensor([5, 2, 5]), z)
    expected = torch.nn.functional.normalize(0.5 * before[5] + 0.5 * z[2], dim=0)
    assert torch.allclose(bank.memory[5], expected, atol=1e-6)


def test_update_has_no_autograd_and_detaches():
    bank = MemoryBank(10, dim=4)
    z = torch.randn(2, 4, requires_grad=True)
    bank.update(torch.tensor([1, 2]), z * 2)
    assert not bank.memory.requires_grad and bank.memory.grad_fn is None


@pytest.mark.parametrize(("n", "k"), [(300, 20), (300, 2000), (40, 3)])
def test_score_strategies_agree_and_match_definition(n, k):
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(n, dim=16, generator=g)
    z = torch.randn(6, 16, generator=g)
    idx = torch.randint(0, n, (6, k + 1), generator=g)
    reference = torch.einsum("bd,bkd->bk", z, bank.memory[idx])
    results = {}
    for strategy in ("rows", "full", "auto"):
        zz = z.clone().requires_grad_(True)
        out = bank.scores(zz, idx, strategy=strategy)
        assert out.shape == (6, k + 1)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out * weights).sum().backward()
        results[strategy] = (out.detach(), zz.grad)
        assert torch.allclose(out, reference, atol=1e-5)
    for strategy in ("full", "auto"):
        assert torch.allclose(results[strategy][0], results["rows"][0], atol=1e-5)
        assert torch.allclose(results[strategy][1], results["rows"][1], atol=1e-4)
    assert bank.memory.grad is None


def test_rows_and_validation():
    bank = MemoryBank(20, dim=4)
    idx = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(bank.rows(idx), bank.memory[idx])
    with pytest.raises(MethodError, match="z must have shape"):
        bank.scores(torch.randn(2, 5), idx)
    with pytest.raises(MethodError, match="idx"):
        bank.scores(torch.randn(2, 4), torch.tensor([1, 2]))
    with pytest.raises(MethodError, match="strategy"):
        bank.scores(torch.randn(2, 4), idx, strategy="fast")
    with pytest.raises(MethodError, match="rows"):
        bank.update(torch.tensor([1, 2, 3]), torch.randn(2, 4))
    with pytest.raises(MethodError, match="momentum"):
        MemoryBank(10, momentum=1.0)


def test_state_dict_round_trip():
    bank = MemoryBank(30, dim=8)
    bank.update(torch.tensor([0, 5]), torch.randn(2, 8))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    other = MemoryBank(30, dim=8)
    assert not torch.equal(other.memory, bank.memory)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.memory, bank.memory)


# ---------------------------------------------------------------------------------------------- the sampler
def make_labels(n: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % classes)[torch.randperm(n, generator=g)]


METHODS = ["draw", "topk"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [5, 200, 850])
def test_sampler_layout_classes_and_no_duplicates(k, method):
    labels = make_labels(1000, 10)
    sampler = ClassAwareNegativeSampler(labels, k, method=method)
    index = torch.tensor([0, 7, 999, 500, 7])
    out = sampler.sample(index, generator=torch.Generator().manual_seed(1))
    assert out.shape == (5, k + 1) and out.dtype == torch.long
    assert torch.equal(out[:, 0], index)
    assert not bool((labels[out[:, 1:]] == labels[index].unsqueeze(1)).any())
    assert int(out.min()) >= 0 and int(out.max()) < 1000
    for row in out[:, 1:]:
        assert row.unique().numel() == k


@pytest.mark.parametrize("method", METHODS)
def test_sampler_uniform_over_pool(method):
    # classes of sizes 4, 6, 10; anchors of class 0 draw 4 of the 16 others: each is picked 1/4 of the time
    labels = torch.tensor([0] * 4 + [1] * 6 + [2] * 10)
    sampler = ClassAwareNegativeSampler(labels, 4, method=method)
    g = torch.Generator().manual_seed(0)
    out = sampler.sample(torch.zeros(4000, dtype=torch.long), generator=g)[:, 1:]
    counts = torch.bincount(out.flatten(), minlength=20).double()
    assert counts[:4].sum() == 0
    expected = 4000 * 4 / 16
    chi2 = float(((counts[4:] - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001
    assert all(row.unique().numel() == 4 for row in out[:200])


@pytest.mark.parametrize("method", METHODS)
def test_sampler_unbalanced_classes(method):
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 45)
    sampler = ClassAwareNegativeSampler(labels, 40, method=method)
    index = torch.tensor([0, 50, 99, 54])
    out = sampler.sample(index, generator=torch.Generator().manual_seed(2))
    assert not bool((labels[out[:, 1:]] == labels[index].unsqueeze(1)).any())
    assert all(row.unique().numel() == 40 for row in out[:, 1:])


@pytest.mark.parametrize("method", METHODS)
def test_sampler_seeded_generator_reproducible(method):
    labels = make_labels(500, 5)
    sampler = ClassAwareNegativeSampler(labels, 64, method=method)
    index = torch.arange(0, 500, 37)
    a = sampler.sample(index, generator=torch.Generator().manual_seed(7))
    b = sampler.sample(index, generator=torch.Generator().manual_seed(7))
    c = sampler.sample(index, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", METHODS)
def test_sampler_with_replacement_when_pool_too_small(method):
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = ClassAwareNegativeSampler(labels, 4, method=method)
    assert len(caught) == 1 and "with replacement" in str(caught[0].message)
    out = sampler.sample(torch.tensor([0, 3, 5]), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 5)
    assert not bool((labels[out[:, 1:]] == labels[out[:, :1]]).any())
    # class 2's pool has 5 samples >= 4: still without replacement
    assert out[2, 1:].unique().numel() == 4
    # every pool smaller than K
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = ClassAwareNegativeSampler(torch.tensor([0, 1, 1]), 3, method=method)
    out = tiny.sample(torch.tensor([1, 0]), generator=torch.Generator().manual_seed(0))
    assert out[0, 1:].tolist() == [0, 0, 0] and set(out[1, 1:].tolist()) <= {1, 2}


def test_sampler_auto_method_choice():
    labels = make_labels(50_000, 100)
    assert ClassAwareNegativeSampler(labels, 4096).method == "draw"
    assert ClassAwareNegativeSampler(labels, 16384).method == "draw"
    assert ClassAwareNegativeSampler(labels, 40000).method == "topk"


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_cpu_generator_labels_elsewhere(device):
    labels = make_labels(200, 4).to(device)
    sampler = ClassAwareNegativeSampler(labels, 16)
    index = torch.tensor([1, 2, 3], device=device)
    out = sampler.sample(index, generator=torch.Generator().manual_seed(0))
    assert out.device == labels.device
    assert torch.equal(out, sampler.sample(index.cpu(), generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, 17) and not bool((labels[out[:, 1:]] == labels[index].unsqueeze(1)).any())
    # without a generator, sampling runs where the labels live
    assert sampler.sample(index).device == labels.device


def test_sampler_validation():
    with pytest.raises(MethodError, match="same class"):
        ClassAwareNegativeSampler(torch.zeros(10, dtype=torch.long), 2)
    with pytest.raises(MethodError, match="num_negatives"):
        ClassAwareNegativeSampler(torch.tensor([0, 1]), 0)
    with pytest.raises(MethodError, match="method"):
        ClassAwareNegativeSampler(torch.tensor([0, 1]), 1, method="fast")
    sampler = ClassAwareNegativeSampler(torch.tensor([0, 1, 0, 1]), 1)
    with pytest.raises(MethodError, match="index"):
        sampler.sample(torch.tensor([4]))


# ------------------------------------------------------------------------------------------- distributed
def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        bank = MemoryBank(20, dim=4, generator=torch.Generator().manual_seed(0))
        idx = [torch.tensor([1, 5, 7]), torch.tensor([7, 9])][rank]  # unequal sizes; 7 on both ranks
        z = torch.randn(idx.numel(), 4, generator=torch.Generator().manual_seed(100 + rank))
        bank.update(idx, z)
        queue.put((rank, idx, z, bank.memory.clone()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_under_distributed_keeps_ranks_identical():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    (_, i0, z0, m0), (_, i1, z1, m1) = results
    assert torch.equal(m0, m1)
    reference = MemoryBank(20, dim=4, generator=torch.Generator().manual_seed(0))
    reference.update(torch.cat([i0, i1]), torch.cat([z0, z1]))  # rank order; rank 1's copy of row 7 wins
    assert torch.equal(reference.memory, m0)
