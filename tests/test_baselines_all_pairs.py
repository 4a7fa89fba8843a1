"""Every baseline builds and trains one step on every pair of the paper's tables and of RepDistiller's
benchmark (slow).

The fast suite steps each method on one same-family and one cross-architecture pair; this sweep covers all
the published pairs: 13 methods x 23 pairs, 32x32 input, batch 2. FSP must refuse exactly the pairs whose
feat[:-1] channel counts differ (RepDistiller's "N/A"), with a MethodError naming the layers.
"""

from __future__ import annotations

import pytest
import torch

import mimkd
from mimkd.errors import MethodError
from mimkd.models import build_model

BASELINES = ["fitnets", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "crd+kd"]
SAME_FAMILY = [
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
]  # fmt: skip
CROSS = [
    ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"),
]  # fmt: skip
PAPER = [
    ("wrn_40_2", "wrn_16_1"), ("resnet110", "resnet8"), ("resnet110", "wrn_16_1"), ("resnet32x4", "wrn_16_2"),
    ("vgg19", "vgg8"), ("resnet32x4", "vgg8"), ("vgg13", "ShuffleV1"), ("ResNet50", "ShuffleV2"),
]  # fmt: skip
PAIRS = SAME_FAMILY + CROSS + PAPER


@pytest.mark.slow
@pytest.mark.parametrize(("t_name", "s_name"), PAIRS)
def test_every_baseline_on_every_published_pair(t_name, s_name):
    torch.manual_seed(0)
    teacher = build_model(t_name, num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([3, 7])
    labels = torch.arange(64) % 100
    for method in BASELINES:
        student = build_model(s_name, num_classes=100)
        try:
            d = (
                mimkd.build_distiller(
                    method, student, teacher, x, num_classes=100, train_labels=labels, num_negatives=16
                )
                if method.startswith("crd")
                else mimkd.build_distiller(method, student, teacher, x, num_classes=100)
            )
        except MethodError as e:
            assert method == "fsp", f"{method} refused {t_name}->{s_name}: {e}"
            assert "ch" in str(e)
            continue
        d.train()
        for stage in d.init_stages():
            loss = sum(stage.loss_fn(x, torch.tensor([0, 1])).values())
            assert torch.isfinite(loss), f"{method} init stage {stage.name} on {t_name}->{s_name}"
            loss.backward()
        d.zero_grad(set_to_none=True)
        d.train()
        _, terms = d(x, y, torch.tensor([0, 1]))
        total = sum(terms.values())
        assert torch.isfinite(total), f"{method} on {t_name}->{s_name}: {terms}"
        total.backward()
        assert all(p.grad is None for p in teacher.parameters())
    if (t_name, s_name) == ("wrn_40_2", "wrn_40_1"):
        with pytest.raises(MethodError):
            mimkd.build_distiller("fsp", build_model(s_name, num_classes=100), teacher, x, num_classes=100)


@pytest.mark.slow
@pytest.mark.parametrize(("t_name", "s_name"), PAIRS)
def test_related_methods_on_every_published_pair(t_name, s_name):
    """WCoRD, KDEP (after its offline pass) and DCM (the student with a peer of the teacher's architecture)
    build and step on every pair; KDEP's SVD refuses exactly the pairs whose student is the wider."""
    torch.manual_seed(0)
    teacher = build_model(t_name, num_classes=100)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([3, 7, 1, 0])
    idx = torch.arange(4)
    labels = torch.arange(64) % 100
    for method in ("wcord", "wcord+kd", "kdep", "dcm"):
        student = build_model(s_name, num_classes=100)
        if method == "dcm":
            d = mimkd.build_distiller(method, student, None, x, num_classes=100, peer=t_name)
        elif method == "kdep":
            try:
                d = mimkd.build_distiller(method, student, teacher, x, num_classes=100)
            except MethodError as e:
                assert "interp" in str(e), f"kdep refused {t_name}->{s_name}: {e}"
                continue
            d.offline_pass([x], 1, None)
        else:
            d = mimkd.build_distiller(
                method, student, teacher, x, num_classes=100, train_labels=labels, num_negatives=16
            )
        d.train()
        _, terms = d(x, y if d.uses_labels else None, idx)
        total = sum(terms.values())
        assert torch.isfinite(total), f"{method} on {t_name}->{s_name}: {terms}"
        total.backward()
        assert all(p.grad is None for p in teacher.parameters())
