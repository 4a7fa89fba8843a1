"""Memory banks at ImageNet size (issue 19): the O(B·K) negative sampler, the in-place bank update with
exact gradients, chunked scoring and the cost model (docs/methods/crd.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mimkd.mi import bank_scores as bs
from mimkd.mi import sampler as sampler_module
from mimkd.mi.memory import ClassAwareNegativeSampler, MemoryBank


# ------------------------------------------------------------------------------------------ the sampler
def _reference_positions(stream: torch.Tensor, k: int, pool: int) -> torch.Tensor:
    """The previous algorithm, written plainly: keep each row's first occurrences, in stream order."""
    out = []
    for row in stream.tolist():
        seen, kept = set(), []
        for v in row:
            if v not in seen:
                seen.add(v)
                kept.append(v)
            if len(kept) == k:
                break
        out.append(kept)
    return torch.tensor(out)


def test_draws_equal_the_first_occurrence_reference_given_the_same_stream():
    labels = torch.arange(600) % 6  # equal pools of 500: positions are drawn directly
    sampler = ClassAwareNegativeSampler(labels, 40, method="draw")
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    pool = torch.full((9,), 500)
    got = sampler._draw_positions(pool, g1)
    stream = torch.randint(0, 500, (9, max(sampler._draws, 40)), generator=g2)
    assert torch.equal(got, _reference_positions(stream, 40, 500))


@pytest.mark.parametrize("pool", [7, 300, 5000])
def test_table_and_sort_find_the_same_first_occurrences(pool, monkeypatch):
    stream = torch.randint(0, pool, (6, 400), generator=torch.Generator().manual_seed(pool))
    table = sampler_module.first_occurrences(stream, pool)
    monkeypatch.setattr(sampler_module, "TABLE_ENTRIES", 0)
    assert torch.equal(sampler_module.first_occurrences(stream, pool), table)
    row = stream[0].tolist()
    assert table[0].tolist() == [v not in row[:i] for i, v in enumerate(row)]


@pytest.mark.parametrize("method", ["draw", "topk"])
def test_negatives_other_class_no_repeats_uniform_over_the_pool(method):
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 9 + [3] * 3)  # unequal classes: pools 17, 19, 15, 21
    n, k = labels.numel(), 6
    sampler = ClassAwareNegativeSampler(labels, k, method=method)
    g = torch.Generator().manual_seed(0)
    anchors = torch.arange(n).repeat(400)
    idx = sampler.sample(anchors, g)
    assert torch.equal(idx[:, 0], anchors)
    neg = idx[:, 1:]
    assert (labels[neg] != labels[anchors].unsqueeze(1)).all()
    assert (neg.sort(dim=1).values.diff(dim=1) > 0).all()
    for a in (0, 7, 12, 21):  # one anchor of each class: every pool member equally often
        rows = neg[anchors == a]
        pool = torch.nonzero(labels != labels[a]).flatten()
        counts = torch.bincount(rows.flatten(), minlength=n)[pool].double()
        expected = rows.numel() / pool.numel()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # chi-square with pool-1 <= 20 degrees of freedom, p = 0.001: 45.3
        assert chi2 < 45.3, (a, chi2)


def test_sampler_memory_per_call_does_not_grow_with_n():
    """N = 10 million samples, B = 4, K = 16384: a B×N table (the previous algorithm) is 160 MB."""
    code = textwrap.dedent(
        """
        import resource, torch
        from mimkd.mi.memory import ClassAwareNegativeSampler
        torch.set_num_threads(1)
        labels = torch.arange(10_000_000) % 1000
        s = ClassAwareNegativeSampler(labels, 16384)
        g = torch.Generator().manual_seed(0)
        s.sample(torch.arange(4), g)  # tables built, allocator warmed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i in range(5):
            out = s.sample(torch.arange(4) * 997 + i, g)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.shape == (4, 16385)
        print((after - before) / 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    assert grown_mib < 40, grown_mib


# ------------------------------------------------------------------------------------------ the bank
def _reference(memory: torch.Tensor, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return (memory[idx] * z.unsqueeze(1)).sum(-1)


@pytest.mark.parametrize("strategy", ["full", "rows"])
@pytest.mark.parametrize("chunk_bytes", [2**26, 700])
def test_scores_and_gradients_are_those_of_the_bank_before_its_in_place_updates(
    strategy, chunk_bytes, monkeypatch
):
    # 700 bytes: several chunks per call on either path
    monkeypatch.setattr(bs, "FULL_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(bs, "ROWS_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(50, 8, momentum=0.5, generator=g)
    before = bank.memory.clone()
    z = torch.randn(6, 8, generator=g, requires_grad=True)
    idx = torch.randint(0, 50, (6, 5), generator=g)
    idx[:, 0] = torch.tensor([3, 4, 5, 3, 7, 8])  # anchors, one repeated
    idx[0, 3] = 3  # a repeated column too
    weights = torch.randn(6, 5, generator=g)
    out = bank.scores(z, idx, strategy=strategy)
    torch.testing.assert_close(out, _reference(before, z.detach(), idx))
    memory_id = bank.memory.data_ptr()
    bank.update(idx[:, 0], torch.randn(6, 8, generator=g))  # overwrites rows the scores read
    bank.update(torch.tensor([3, 9, 9]), torch.randn(3, 8, generator=g))  # a second update, duplicates
    assert bank.memory.data_ptr() == memory_id  # in place: no copy of the bank
    (out * weights).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (_reference(before, z_ref, idx) * weights).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)


def test_update_last_occurrence_wins_and_rows_are_unit_norm():
    bank = MemoryBank(10, 4, momentum=0.5, generator=torch.Generator().manual_seed(1))
    old = bank.memory.clone()
    z = torch.randn(4, 4)
    bank.update(torch.tensor([2, 5, 2, 7]), z)
    for row, value in ((2, z[2]), (5, z[1]), (7, z[3])):
        expect = torch.nn.functional.normalize(0.5 * old[row] + 0.5 * value, dim=0)
        torch.testing.assert_close(bank.memory[row], expect)
    untouched = [i for i in range(10) if i not in (2, 5, 7)]
    assert torch.equal(bank.memory[untouched], old[untouched])


def test_no_grad_scores_leave_no_log():
    bank = MemoryBank(20, 4)
    with torch.no_grad():
        bank.scores(torch.randn(2, 4, requires_grad=True), torch.zeros(2, 3, dtype=torch.long))
    assert not [r for r in bank._logs if r() is not None]


# ------------------------------------------------------------------------------------------ cost model
def test_cost_model_prefers_rows_for_a_sparse_read_and_full_for_a_dense_one():
    assert bs.choose_strategy(1_281_167, 256, 64, 128) == "rows"
    assert bs.choose_strategy(6_000, 64, 4096, 128) == "full"
    for n in (50_000, 200_000, 1_281_167):  # the batch cancels: both paths scale with B
        assert bs.choose_strategy(n, 64, 4096, 128) == bs.choose_strategy(n, 256, 4096, 128)
    full = bs.estimate_seconds(200_000, 64, 4096, 128, "full")
    assert bs.estimate_seconds(400_000, 64, 4096, 128, "full") == pytest.approx(2 * full)


# ------------------------------------------------------------------------------------------ the CLI
def _mimkd(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mimkd", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_bench_bank_size_projects_each_bank_method(tmp_path):
    res = _mimkd(
        "bench", "--bank-size", "20000", "--batch-size", "8", "--methods", "kd,crd,mimkd", "--threads", "1",
        "--out", str(tmp_path / "banks"), cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "banks.md").read_text()
    assert "N = 20,000" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert {"crd", "mimkd"} <= set(rows) and "kd" not in rows
    assert "| 16384 | 2 |" in rows["crd"] and "| 4096 | 2 |" in rows["mimkd"]
    assert bs.choose_strategy(20000, 8, 16384, 128) in rows["crd"]


def test_bench_bank_size_refuses_methods_without_a_bank(tmp_path):
    res = _mimkd("bench", "--bank-size", "1000", "--methods", "kd,dkd", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("mimkd: error: --bank-size: none of --methods")
    assert len(res.stderr.strip().splitlines()) == 1


def test_bench_row_with_its_own_options_is_parsed_and_checked():
    from mimkd.bench.report import resolve_methods, split_row
    from mimkd.errors import MimkdError

    assert split_row("mimkd:critic_locations=16:critic_width=32") == (
        "mimkd",
        {"critic_locations": 16, "critic_width": 32},
    )
    assert resolve_methods("kd,mimkd,mimkd:critic_locations=16") == [
        "kd",
        "mimkd",
        "mimkd:critic_locations=16",
    ]
    with pytest.raises(MimkdError, match="critic_location"):
        resolve_methods("mimkd:critic_location=16")
