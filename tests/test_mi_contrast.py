"""BankContrast (docs/methods/crd.md): bidirectional bank scores, infoNCE/NCE values, updates before
backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mimkd.mi.contrast import BankContrast
from mimkd.mi.memory import MemoryBank


def _unit(b, d, seed):
    return F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("strategy", ["full", "rows"])
def test_update_before_backward_keeps_gradient_of_the_pre_update_bank(strategy):
    torch.manual_seed(0)
    bank = MemoryBank(50, dim=8)
    old = bank.memory.clone()
    z = torch.randn(4, 8, requires_grad=True)
    idx = torch.randint(0, 50, (4, 20))
    scores = bank.scores(z, idx, strategy=strategy)
    bank.update(torch.tensor([1, 2, 3, 4]), torch.randn(4, 8))  # inside the forward, as CRD does
    weights = torch.randn(4, 20)
    (scores * weights).sum().backward()
    expected = torch.einsum("bk,bkd->bd", weights, old[idx])
    torch.testing.assert_close(z.grad, expected)
    assert not torch.equal(bank.memory[1:5], old[1:5])


def test_infonce_with_equal_scores_gives_log_k_plus_1_and_zero_estimate():
    labels = torch.arange(40) % 4
    c = BankContrast(labels, dim=8, num_negatives=12, temperature=0.5, loss="infonce")
    for bank in (c.bank_student, c.bank_teacher):
        bank.memory.zero_()  # all scores 0 -> every row of logits equal
    z = _unit(3, 8, 0)
    loss, est = c(z, z, torch.tensor([0, 1, 2]))
    assert float(loss) == pytest.approx(2 * math.log(13), rel=1e-6)  # both directions
    assert float(est) == pytest.approx(0.0, abs=1e-6)


def test_single_direction_and_bank_rows_unit_norm_after_update():
    labels = torch.arange(40) % 4
    c = BankContrast(labels, dim=8, num_negatives=12, directions="student")
    idx = torch.tensor([5, 6, 7])
    loss, _ = c(_unit(3, 8, 1), _unit(3, 8, 2), idx)
    c2 = BankContrast(labels, dim=8, num_negatives=12, directions="both")
    assert torch.isfinite(loss)
    for bank in (c.bank_student, c.bank_teacher):
        torch.testing.assert_close(bank.memory[idx].norm(dim=1), torch.ones(3))
    assert c2.num_samples == 40


def test_nce_fixes_z_at_first_call_then_keeps_it():
    labels = torch.arange(60) % 3
    c = BankContrast(labels, dim=8, num_negatives=10, loss="nce")
    c(_unit(4, 8, 3), _unit(4, 8, 4), torch.arange(4))
    z1 = float(c.z_student_anchor), float(c.z_teacher_anchor)
    assert z1[0] > 0 and z1[1] > 0
    c(_unit(4, 8, 5), _unit(4, 8, 6), torch.arange(4, 8))
    assert (float(c.z_student_anchor), float(c.z_teacher_anchor)) == z1
    assert "z_student_anchor" in c.state_dict()


def test_missing_index_is_a_clear_error():
    from mimkd.errors import MethodError

    c = BankContrast(torch.arange(20) % 2, dim=4, num_negatives=3)
    with pytest.raises(MethodError, match="dataset index"):
        c(_unit(2, 4, 0), _unit(2, 4, 1), None)
