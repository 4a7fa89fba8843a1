"""MIMKD's remedies (issue 16): live global positive, critic warm-up, critic learning rate, ``mimkd+kd``, and
the memory-bank schedule warnings, on real networks and (for the runs) real Fashion-MNIST data."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch

from mimkd.config import build_config
from mimkd.distillers import build_distiller
from mimkd.distillers.mimkd import MIMKD
from mimkd.engine.logging import NullLog
from mimkd.engine.recipe import set_lr
from mimkd.engine.setup import StudentInfo, prepare, run
from mimkd.engine.trainer import Trainer
from mimkd.errors import MimkdWarning
from mimkd.mi.bounds import infonce_loss
from mimkd.mi.contrast import MIN_VISITS, BankContrast
from mimkd.models import build_network

from helpers import needs_fmnist


# -- live positive ------------------------------------------------------------------------------------
def _contrast(positive: str) -> BankContrast:
    labels = torch.arange(40) % 4
    return BankContrast(
        labels, dim=8, num_negatives=6, temperature=0.5, positive=positive, directions="student"
    )


def test_live_positive_scores_the_current_embeddings_not_the_bank_row():
    torch.manual_seed(0)
    z_s = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    z_t = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    index = torch.tensor([0, 4, 8, 12, 16])  # one class: no anchor's row is another anchor's negative
    live = _contrast("live")
    bank_t = live.bank_teacher.memory.clone()
    torch.manual_seed(1)
    idx = live.sampler.sample(index)
    torch.manual_seed(1)
    loss, _ = live(z_s, z_t, index)
    pos = (z_s * z_t).sum(1) / 0.5
    neg = torch.einsum("bd,bkd->bk", z_s, bank_t[idx[:, 1:]]) / 0.5
    assert loss == pytest.approx(float(infonce_loss(pos, neg)), rel=1e-5)
    # the bank's own rows of the anchors play no part: scrambling them leaves the live loss unchanged
    again = _contrast("live")
    again.bank_teacher.memory.copy_(bank_t)
    again.bank_teacher.memory[index] = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    torch.manual_seed(1)
    assert again(z_s, z_t, index)[0] == pytest.approx(float(loss), rel=1e-6)
    # ... whereas the bank positive reads exactly those rows
    bank = _contrast("bank")
    bank.bank_teacher.memory.copy_(bank_t)
    torch.manual_seed(1)
    expected = infonce_loss(torch.einsum("bd,bd->b", z_s, bank_t[index]) / 0.5, neg)
    assert bank(z_s, z_t, index)[0] == pytest.approx(float(expected), rel=1e-5)


def test_live_positive_sends_gradient_to_both_embeddings():
    z_s = torch.randn(5, 8, requires_grad=True)
    z_t = torch.randn(5, 8, requires_grad=True)
    c = _contrast("live")
    loss, _ = c(
        torch.nn.functional.normalize(z_s, dim=1), torch.nn.functional.normalize(z_t, dim=1), torch.arange(5)
    )
    loss.backward()
    assert z_s.grad.abs().sum() > 0 and z_t.grad.abs().sum() > 0


# -- schedule warnings --------------------------------------------------------------------------------
def test_bank_warnings_fire_exactly_at_the_thresholds():
    labels = torch.arange(100) % 10  # 10 classes of 10: the smallest other-class pool is 90
    at = BankContrast(labels, dim=4, num_negatives=45)
    above = BankContrast(labels, dim=4, num_negatives=46)
    assert at.schedule_warnings(MIN_VISITS) == []
    [w] = above.schedule_warnings(MIN_VISITS)
    assert "K=46" in w and "90" in w and "method.num_negatives" in w
    [w] = at.schedule_warnings(MIN_VISITS - 0.01)
    assert "19.99 times" in w and "critic_warmup_epochs" in w
    live = BankContrast(labels, dim=4, num_negatives=45, positive="live")
    assert live.schedule_warnings(1.0) == []  # a live positive is never stale


# -- the method ---------------------------------------------------------------------------------------
def _mimkd(**options):
    torch.manual_seed(0)
    student, teacher = build_network("conv4mp_w32", 10, 1), build_network("cnn_teacher", 10, 1)
    labels = torch.arange(200) % 10
    return build_distiller(
        "mimkd", student, teacher, torch.randn(4, 1, 28, 28), num_classes=10, train_labels=labels,
        **{"critic_width": 8, "num_negatives": 16, **options},
    )  # fmt: skip


def test_critic_lr_scale_gives_the_critics_their_own_rate(tmp_path):
    d = _mimkd(critic_lr_scale=4.0)
    assert set(d.lr_scales()) == {"global_critic.", "local_critic.", "feature_critics."}
    assert _mimkd().lr_scales() == {}
    from mimkd.config import OptimConfig
    from mimkd.engine.recipe import build_optimizer, param_groups

    opt = build_optimizer(
        OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9),
        param_groups(d.trainable_named_parameters(), d.lr_scales()),
    )
    set_lr(opt, 0.1)
    by_scale = {g["lr_scale"]: g for g in opt.param_groups}
    assert by_scale[1.0]["lr"] == pytest.approx(0.1) and by_scale[4.0]["lr"] == pytest.approx(0.4)
    student = {id(p) for p in d.student.parameters()}
    assert all(id(p) in student for p in by_scale[1.0]["params"])
    critics = {id(p) for c in d._critics() for p in c.parameters()}
    assert {id(p) for p in by_scale[4.0]["params"]} == critics


def test_mimkd_plus_kd_is_registered_with_a_kd_term():
    torch.manual_seed(0)
    student, teacher = build_network("conv4mp_w32", 10, 1), build_network("cnn_teacher", 10, 1)
    d = build_distiller(
        "mimkd+kd", student, teacher, torch.randn(4, 1, 28, 28), num_classes=10,
        train_labels=torch.arange(200) % 10, critic_width=8, num_negatives=16,
    )  # fmt: skip
    assert isinstance(d, MIMKD) and d.options.kd_weight > 0
    _, terms = d(torch.randn(8, 1, 28, 28), torch.arange(8), torch.arange(8))
    assert {"ce", "kd", "mi_global", "mi_local", "mi_feature"} <= set(terms)


def _cfg(tiny_teacher, tmp_path, name: str, **method):
    return build_config(
        {
            "seed": 7,
            "threads": 1,
            "out_dir": str(tmp_path),
            "name": name,
            "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.05},
            "student": {"arch": "conv4mp_w32"},
            "teacher": {"arch": "cnn_teacher", "checkpoint": str(tiny_teacher)},
            "method": {"name": "mimkd", "critic_width": 16, "num_negatives": 64, **method},
            "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05},
            "train": {"progress": False, "eval_teacher": False, "checkpoint_every_steps": 4},
        }
    )


@needs_fmnist
def test_warmup_leaves_the_student_bit_identical_and_moves_the_critics(tiny_teacher, tmp_path):
    p = prepare(_cfg(tiny_teacher, tmp_path, "w", critic_warmup_epochs=1))
    info = StudentInfo("conv4mp_w32", 10, 1)
    trainer = Trainer(p.cfg, p.distiller, p.train, p.test, p.run_dir, p.device, info, p.augment)
    trainer._t0 = time.time()
    p.run_dir.mkdir(parents=True)
    student = copy.deepcopy(p.distiller.student.state_dict())
    method = copy.deepcopy(p.distiller.method_state_dict())
    trainer.run_init_stages(NullLog())
    for k, v in p.distiller.student.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(v, student[k]), f"student {k} changed during the critic warm-up"
    after = p.distiller.method_state_dict()
    for part in ("global_critic.", "local_critic.", "feature_critics.", "contrast.bank_student."):
        keys = [k for k in after if k.startswith(part) and after[k].is_floating_point()]
        assert keys and any(not torch.equal(after[k], method[k]) for k in keys), f"{part} did not move"
    assert all(p.grad is None or not p.grad.abs().sum() for p in p.distiller.student.parameters())


@needs_fmnist
def test_resume_inside_the_warmup_is_bit_identical(tiny_teacher, tmp_path, monkeypatch):
    ref = run(_cfg(tiny_teacher, tmp_path, "ref", critic_warmup_epochs=2))
    assert ref["status"] == "finished"
    calls = {"n": 0}
    original = MIMKD._warmup_terms

    def crashing(self, images, index):
        calls["n"] += 1
        if calls["n"] == 25:  # epoch 2 of the warm-up (18 steps per epoch), after a mid-epoch checkpoint
            raise KeyboardInterrupt
        return original(self, images, index)

    monkeypatch.setattr(MIMKD, "_warmup_terms", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tiny_teacher, tmp_path, "cut", critic_warmup_epochs=2))
    ck = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["init"]["done"] == 0 and ck["init"]["epoch"] == 1 and ck["init"]["step"] == 4
    monkeypatch.setattr(MIMKD, "_warmup_terms", original)
    assert (
        run(_cfg(tiny_teacher, tmp_path, "cut", critic_warmup_epochs=2), resume=True)["status"] == "finished"
    )
    a = torch.load(tmp_path / "ref" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    for key in ("model", "method_state"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resuming inside the warm-up"


@needs_fmnist
def test_a_short_bank_run_warns_once_per_problem_before_training(tiny_teacher, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(_cfg(tiny_teacher, tmp_path, "short", num_negatives=1000))
    messages = [str(w.message) for w in caught if issubclass(w.category, MimkdWarning)]
    assert sum("bank negatives are" in m for m in messages) == 1
    assert sum("times in this run" in m for m in messages) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(_cfg(tiny_teacher, tmp_path, "live", global_positive="live"))
    assert not [w for w in caught if "bank" in str(w.message) and issubclass(w.category, MimkdWarning)]
