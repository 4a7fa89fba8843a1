"""MIMKD (docs/mimkd.md): the set R for the paper's pairs, gradients, modes, errors, a real step per pair."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import mimkd
from mimkd.errors import MethodError
from mimkd.models import build_model

SMALL = dict(critic_width=32, num_negatives=16)  # keeps the fast suite fast; shapes are what is tested


def _labels(n=64, classes=100):
    return torch.arange(n) % classes


def _build(t_name, s_name, size=32, classes=100, channels=3, **opts):
    torch.manual_seed(0)
    t = build_model(t_name, num_classes=classes, in_channels=channels)
    s = build_model(s_name, num_classes=classes, in_channels=channels)
    x = torch.randn(2, channels, size, size)
    return mimkd.build_distiller("mimkd", s, t, x, train_labels=_labels(64, classes), **{**SMALL, **opts})


def _stage(model_name, i, **kw):
    """Module path of RepDistiller's feat[i] for a zoo model."""
    return build_model(model_name, **kw).feature_points.stages[i]


# The benchmark pairs' R (docs/methods/mimkd.md): teacher → student, the feature indices of R on each side,
# and the local map.
R_TABLE = [
    ("wrn_40_2", "wrn_16_1", [1, 2, 3], [1, 2, 3], 3),
    ("wrn_40_2", "wrn_16_2", [1, 2, 3], [1, 2, 3], 3),
    ("resnet110", "resnet8", [1, 2, 3], [1, 2, 3], 3),
    ("resnet110", "resnet20", [1, 2, 3], [1, 2, 3], 3),
    ("resnet56", "resnet20", [1, 2, 3], [1, 2, 3], 3),
    ("resnet32x4", "resnet8x4", [1, 2, 3], [1, 2, 3], 3),
    ("resnet110", "wrn_16_1", [1, 2, 3], [1, 2, 3], 3),
    ("resnet32x4", "wrn_16_2", [1, 2, 3], [1, 2, 3], 3),
    ("vgg19", "vgg8", [1, 2, 4], [1, 2, 4], 4),
    ("vgg13", "vgg8", [1, 2, 4], [1, 2, 4], 4),
    ("resnet32x4", "vgg8", [2, 3], [1, 2], 2),
    ("vgg13", "ShuffleV1", [1, 2, 4], [1, 2, 3], 3),
    ("ResNet50", "ShuffleV2", [2, 3, 4], [1, 2, 3], 3),
    ("vgg13", "MobileNetV2", [1, 2, 4], [1, 2, 3], 3),
]


@pytest.mark.parametrize("t_name,s_name,t_idx,s_idx,local", R_TABLE)
def test_pairing_table_of_the_benchmark_pairs(t_name, s_name, t_idx, s_idx, local):
    d = _build(t_name, s_name)
    assert d.pairs == [(_stage(t_name, i), _stage(s_name, j)) for i, j in zip(t_idx, s_idx)]
    assert d.local_point == _stage(s_name, local)
    sizes = [t.spatial for t, _ in d.pair_specs]
    assert sizes == sorted(sizes, reverse=True)  # shallow to deep
    assert all(t.spatial == s.spatial for t, s in d.pair_specs)


def test_pairing_imagenet_resnet34_to_resnet18():
    torch.manual_seed(0)
    t, s = build_model("resnet34", num_classes=10), build_model("resnet18", num_classes=10)
    d = mimkd.build_distiller(
        "mimkd",
        s,
        t,
        torch.randn(2, 3, 224, 224),
        train_labels=_labels(64, 10),
        lambda_g=0,
        lambda_l=0,
        critic_width=8,
    )
    assert d.pairs == [(f"layer{k}", f"layer{k}") for k in (1, 2, 3, 4)]
    assert [p.spatial for p, _ in d.pair_specs] == [(56, 56), (28, 28), (14, 14), (7, 7)]


@pytest.mark.parametrize("t_name,s_name", sorted({(r[0], r[1]) for r in R_TABLE}))
def test_one_real_training_step_every_paper_pair(t_name, s_name):
    d = _build(t_name, s_name)
    opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.01, momentum=0.9)
    x, y, idx = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)), torch.tensor([0, 5, 9, 33])
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    logits, terms = d(x, y, idx)
    assert logits.shape == (4, 100)
    assert set(terms) == {"ce", "mi_global", "mi_local", "mi_feature"}
    total = sum(terms.values())
    assert torch.isfinite(total)
    opt.zero_grad()
    total.backward()
    opt.step()
    changed = [
        k
        for k, v in d.student.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert changed


def test_gradients_reach_student_and_critics_never_teacher_and_teacher_stays_eval():
    d = _build("resnet20", "resnet8", num_negatives=60)  # B(K+1) > N: the bank's full-matrix scores
    d.train()
    assert d.student.training and not d.teacher.training
    assert all(not p.requires_grad for p in d.teacher.parameters())
    names = [n for n, _ in d.trainable_named_parameters()]
    assert not any(n.startswith("teacher.") for n in names)
    x = torch.randn(4, 3, 32, 32)
    _, terms = d(x, torch.randint(0, 100, (4,)), torch.arange(4))
    for term in ("mi_global", "mi_local", "mi_feature"):
        d.zero_grad(set_to_none=True)
        terms[term].backward(retain_graph=True)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters()), term
        assert all(p.grad is None for p in d.teacher.parameters()), term
    owner = {"mi_global": d.global_critic, "mi_local": d.local_critic, "mi_feature": d.feature_critics}
    for term, module in owner.items():
        d.zero_grad(set_to_none=True)
        terms[term].backward(retain_graph=True)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), term
    d.eval()
    d.train()
    assert not d.teacher.training


def test_zero_weight_terms_build_no_critic():
    d = _build("resnet20", "resnet8", lambda_g=0.0, lambda_l=0.0)
    assert not hasattr(d, "global_critic") and not hasattr(d, "local_critic") and not hasattr(d, "contrast")
    _, terms = d(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert set(terms) == {"ce", "mi_feature"}
    d = _build("resnet20", "resnet8", lambda_f=0.0)
    assert not hasattr(d, "feature_critics")


def test_batch_of_one_with_jsd_terms_raises_clear_error():
    d = _build("resnet20", "resnet8")
    with pytest.raises(MethodError, match="at least 2"):
        d(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.tensor([0]))


class _TinyNet(nn.Module):
    """A foreign model whose only map is 5x5 (no size in common with the CIFAR zoo)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=6, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 100)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_no_common_size_names_sizes_or_runs_local_global_with_warning():
    t = build_model("resnet20")
    x = torch.randn(2, 3, 28, 28)
    with pytest.raises(MethodError, match=r"no feature map size in common.*\(5, 5\).*lambda_f=0"):
        mimkd.build_distiller("mimkd", _TinyNet(), t, x, train_labels=_labels(), **SMALL)
    with pytest.warns(UserWarning, match="no common map size"):
        d = mimkd.build_distiller("mimkd", _TinyNet(), t, x, train_labels=_labels(), lambda_f=0, **SMALL)
    _, terms = d(torch.randn(4, 3, 28, 28), torch.tensor([1, 2, 3, 4]), torch.arange(4))
    assert set(terms) == {"ce", "mi_global", "mi_local"} and torch.isfinite(sum(terms.values()))


def test_jsd_global_ablation_uses_no_bank_and_bank_variants_run():
    d = _build("resnet20", "resnet8", global_estimator="jsd")
    assert not hasattr(d, "contrast")
    _, terms = d(torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3]), None)
    assert torch.isfinite(terms["mi_global"])
    assert d.metrics["mi_global"] <= 0  # the JSD bound of Eq. 2 is never positive
    assert d.global_critic.normalize  # bounded scores: |T| <= 1/tau (the raw dot product diverged)
    raw = _build("resnet20", "resnet8", global_estimator="jsd", jsd_global_score="dot")
    assert not raw.global_critic.normalize
    d = _build("resnet20", "resnet8", global_estimator="nce")
    _, terms = d(torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5]))
    assert float(d.contrast.z_student_anchor) > 0  # CRD's Z fixed at the first call


def test_infonce_global_estimate_is_within_its_ceiling_and_banks_update():
    d = _build("resnet20", "resnet8", lambda_l=0, lambda_f=0, num_negatives=16)
    idx = torch.tensor([0, 1, 2, 3])
    before = d.contrast.bank_student.memory[idx].clone()
    d(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), idx)
    assert float(d.metrics["mi_global"]) <= math.log(17) + 1e-6
    after = d.contrast.bank_student.memory[idx]
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.norm(dim=1), torch.ones(4))


def test_local_map_option_deepest_student_map():
    d = _build("vgg13", "MobileNetV2", local_map="deepest")
    assert d.local_point == _stage("MobileNetV2", 4)  # the 2x2 map, unmatched by the teacher


def test_unknown_option_is_refused_with_suggestion():
    from mimkd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method\.lamda_l.*lambda_l"):
        _build("resnet20", "resnet8", lamda_l=0.5)
