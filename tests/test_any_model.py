"""Any model in: two models the zoo does not know, through every kind of method; timm where it imports."""

from __future__ import annotations

import pytest
import torch

import mimkd
from foreign_models import TVResNet, plain_cnn
from mimkd.errors import ModelError
from mimkd.models import build_network

# one method of each kind: logits, maps, pooled vectors, memory banks, MI critics, OT, label-free, cohorts
METHODS = ["kd", "fitnets", "at", "vid", "rkd", "crd", "mimkd", "wcord", "kdep", "dml", "dcm"]


@pytest.mark.parametrize("method", METHODS)
def test_foreign_teacher_and_student_train_a_step(method):
    torch.manual_seed(0)
    teacher, student = TVResNet(10, 1, width=16), plain_cnn(10, 1)  # no stages named in plain_cnn
    x, y, idx = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.arange(8)
    labels = torch.arange(64) % 10
    opts = {"num_negatives": 16} if method in ("crd", "wcord", "mimkd") else {}
    if method == "dcm":
        opts = {"peer": "foreign_models:tv_resnet", "aux_head": "apfc"}
    if method == "dml":
        opts = {"peers": ["foreign_models:tv_resnet"]}
    t = None if method in ("dml", "dcm") else teacher
    d = mimkd.build_distiller(method, student, t, x, num_classes=10, train_labels=labels, **opts)
    if not d.offline_ready():
        d.offline_pass([x], 1, None)
    d.train()
    logits, terms = d(x, y if d.uses_labels else None, idx)
    assert logits.shape == (8, 10)
    total = sum(terms.values())
    assert torch.isfinite(total), terms
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_timm_models_where_timm_imports():
    try:
        import timm  # noqa: F401
    except Exception as e:  # not installed, or torchvision's CUDA-only build fails on this CPU torch
        with pytest.raises(ModelError, match="timm cannot be imported"):
            build_network("timm:resnet18", 10, 3)
        pytest.skip(f"timm does not import here ({type(e).__name__}: {str(e)[:120]})")
    net = build_network("timm:resnet18", 10, 3)
    d = mimkd.build_distiller("kd", plain_cnn(10, 3), net, torch.randn(4, 3, 32, 32), num_classes=10)
    _, terms = d(torch.randn(4, 3, 32, 32), torch.arange(4), None)
    assert torch.isfinite(sum(terms.values()))
