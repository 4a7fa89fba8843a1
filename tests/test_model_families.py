"""Architecture families: every zoo model declares one, and the methods that adapt to the architecture
(DCM's heads, FT's init-stage lr) read that declaration, never the model's class; a foreign model gets the
fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foreign_models import TVResNet, plain_cnn
from mimkd.distillers import dcm_heads, ft
from mimkd.distillers.dcm_heads import FALLBACK_RULE, HEAD_RULES, SUPPORTED_FAMILIES, family_of, rule_of
from mimkd.distillers.ft import FT, FTOptions, default_init_lr
from mimkd.errors import MethodError
from mimkd.models import available, build_model

ZOO = available()


def _zoo(name: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return build_model(name, 10, 3)


@pytest.fixture(scope="module")
def zoo_models() -> dict[str, nn.Module]:
    return {name: _zoo(name) for name in ZOO}


class _Foreign(nn.Module):
    """A foreign model that happens to have a submodule called ``family`` (an instance attribute, not a
    declaration)."""

    def __init__(self) -> None:
        super().__init__()
        self.family = nn.Identity()
        self.body = plain_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


FOREIGN = [plain_cnn, TVResNet, _Foreign]


def test_every_zoo_model_declares_a_family_with_a_head_rule(zoo_models):
    declared = set()
    for name, model in zoo_models.items():
        family = vars(type(model)).get("family")  # declared on the model's own class
        assert isinstance(family, str) and family in SUPPORTED_FAMILIES, name
        assert family_of(model) == family and rule_of(model) is HEAD_RULES[family], name
        declared.add(family)
    assert declared == set(HEAD_RULES)  # every rule serves a zoo family


@pytest.mark.parametrize("make", FOREIGN, ids=lambda f: f.__name__)
def test_a_foreign_model_gets_the_fallback_rule(make):
    model = make()
    assert family_of(model) is None and rule_of(model) is FALLBACK_RULE
    assert not FALLBACK_RULE.stages_defined and FALLBACK_RULE.points is None
    c, size = (3, 32) if make is TVResNet else (1, 28)
    x = torch.randn(2, c, size, size)
    with pytest.raises(MethodError, match="aux_head=apfc"):
        dcm_heads.build_aux_heads(model, 10, x)
    aux = dcm_heads.build_aux_heads(model, 10, x, "apfc")
    assert aux.family == "other" and set(aux.heads) == {"C3", "C2"}


def test_an_undeclared_family_name_gets_the_fallback_rule():
    class Odd(nn.Module):
        family = "not_a_zoo_family"

    assert family_of(Odd()) is None and rule_of(Odd()) is FALLBACK_RULE


# RepDistiller pre-trains FT's paraphraser at lr 0.01 for exactly these students (its CIFAR ResNets and WRNs)
REPDISTILLER_LR_001 = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
    "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
}  # fmt: skip


@pytest.mark.parametrize("name", ZOO)
def test_ft_init_lr_of_every_zoo_model(name, zoo_models):
    model = zoo_models[name]
    expected = 0.01 if name in REPDISTILLER_LR_001 else None
    assert default_init_lr(model) == expected
    stub = type("Stub", (), {"options": FTOptions(), "student": model})()
    assert FT.stage_lr(stub) == expected
    stub.options = FTOptions(init_lr=0.05)
    assert FT.stage_lr(stub) == 0.05  # an explicit init_lr overrides the rule


@pytest.mark.parametrize("make", FOREIGN, ids=lambda f: f.__name__)
def test_ft_init_lr_of_a_foreign_model_is_the_base_lr(make):
    assert default_init_lr(make()) is None


def test_the_methods_hold_no_zoo_model_class(zoo_models):
    zoo_classes = {type(m) for m in zoo_models.values()}
    for module in (dcm_heads, ft):
        held = {v for v in vars(module).values() if isinstance(v, type)}
        assert not held & zoo_classes, module.__name__
