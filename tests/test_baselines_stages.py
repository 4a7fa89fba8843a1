"""FitNets, AB, FT and FSP (docs/methods/): ConvReg, the pure losses (exact zeros and hand-computed values),
their init stages (names, epochs, modules, what the stage's backward reaches), a real step of every stage."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import mimkd
from foreign_models import plain_cnn
from mimkd.distillers.ab import ab_layer_loss, ab_loss
from mimkd.distillers.connectors import ConvReg
from mimkd.distillers.fitnets import hint_loss
from mimkd.distillers.fsp import fsp_loss, fsp_matrix
from mimkd.distillers.ft import factor, ft_loss
from mimkd.engine.init_stages import _parameters, _stage_modes
from mimkd.errors import MethodError
from mimkd.models import build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # this machine is shared: one thread is much faster than two contended ones
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(method, t_name, s_name, **opts):
    torch.manual_seed(0)
    t = build_model(t_name, num_classes=10) if isinstance(t_name, str) else t_name
    s = build_model(s_name, num_classes=10) if isinstance(s_name, str) else s_name
    return mimkd.build_distiller(method, s, t, torch.randn(4, 3, 32, 32), num_classes=10, **opts)


def _ids(modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


# -- ConvReg ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "s_shape,t_shape,conv_type",
    [
        ((12, 16, 16), (20, 8, 8), nn.Conv2d),  # H_s = 2 H_t: conv 3x3 s2 p1
        ((12, 4, 4), (20, 8, 8), nn.ConvTranspose2d),  # 2 H_s = H_t: ConvTranspose 4x4 s2 p1
        ((12, 7, 6), (20, 4, 4), nn.Conv2d),  # H_s >= H_t: kernel (1+H_s-H_t, 1+W_s-W_t)
        ((12, 4, 4), (20, 4, 4), nn.Conv2d),  # equal sizes: 1x1
    ],
)
def test_convreg_output_shape_and_layout(s_shape, t_shape, conv_type):
    reg = ConvReg(s_shape, t_shape)
    assert type(reg.conv) is conv_type and isinstance(reg.bn, nn.BatchNorm2d)
    out = reg(torch.randn(3, *s_shape))
    assert out.shape == (3, *t_shape) and out.min() >= 0  # ReLU
    if s_shape[1] == 2 * t_shape[1]:
        assert (reg.conv.kernel_size, reg.conv.stride, reg.conv.padding) == ((3, 3), (2, 2), (1, 1))
    elif 2 * s_shape[1] == t_shape[1]:
        assert (reg.conv.kernel_size, reg.conv.stride, reg.conv.padding) == ((4, 4), (2, 2), (1, 1))
    else:
        assert reg.conv.kernel_size == (1 + s_shape[1] - t_shape[1], 1 + s_shape[2] - t_shape[2])
    no_relu = ConvReg(s_shape, t_shape, use_relu=False)(torch.randn(3, *s_shape))
    assert no_relu.min() < 0  # AB's connector: conv + BN only


def test_convreg_refuses_sizes_it_cannot_map():
    with pytest.raises(MethodError, match=r"student 8x3x3, teacher 8x8x8"):
        ConvReg((8, 3, 3), (8, 8, 8))


# -- exact zeros and hand-computed values ------------------------------------------------------------------
def test_hint_loss_zero_and_value():
    t = torch.randn(2, 3, 4, 4)
    assert hint_loss(t.clone(), t) == 0
    r = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hint_loss(r, torch.zeros_like(r)).item() == pytest.approx(30 / 4)


def test_fitnets_zero_when_regressor_output_is_the_teacher_map():
    t = build_model("resnet20", num_classes=10)
    d = _build("fitnets", t, copy.deepcopy(t))
    d.regressor = nn.Identity()
    d.eval()
    _, fs, _, ft = d.run_both(torch.randn(4, 3, 32, 32))
    assert d.method_loss(fs, ft, None, None, None).item() == 0.0


def test_ab_loss_zeros_and_value():
    t = torch.randn(2, 3, 4, 4)
    s_ok = torch.where(t > 0, 1.0 + torch.rand_like(t), -1.0 - torch.rand_like(t))
    s_ok[0, 0, 0, 0] = 1.0 if t[0, 0, 0, 0] > 0 else -1.0  # exactly on the margin is still zero
    assert ab_layer_loss(s_ok, t) == 0 and ab_loss([s_ok], [t]) == 0
    assert ab_layer_loss(torch.zeros_like(t), t).item() == t.numel()  # s = 0: exactly 1 per element
    s = torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.3, -3.0]).view(2, 3, 1, 1)
    tt = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]).view(2, 3, 1, 1)
    # elements: 0, 0.5², 1.5², 0, 0.7², 4²
    assert ab_layer_loss(s, tt).item() == pytest.approx(18.99, rel=1e-6)
    deep_s, deep_t = torch.zeros(2, 1, 2, 2), torch.randn(2, 1, 2, 2)  # 8 elements of loss 1
    # weights 2^{i-n+1} = 1/2, 1; / B = 2; x 3/1000
    expected = 3 / 1000 * (0.5 * 18.99 + 1.0 * 8) / 2
    assert ab_loss([s, deep_s], [tt, deep_t]).item() == pytest.approx(expected, rel=1e-6)


def test_ft_factor_zero_and_value():
    t = torch.randn(2, 8, 4, 4)
    assert ft_loss(3.7 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert ft_loss(torch.randn(2, 8, 8, 8), t).item() > 0
    s = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # mean_c s² at the two locations: 1, 2
    tt = torch.tensor([[[[2.0**0.5, 1.0]], [[2.0**0.5, 1.0]]]])  # 2, 1
    assert torch.allclose(factor(s), torch.tensor([[1.0, 2.0]]) / math.sqrt(5))
    assert ft_loss(s, tt).item() == pytest.approx(1 / math.sqrt(5), rel=1e-6)


def test_fsp_zero_and_value():
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    assert fsp_loss(feats, [f.clone() for f in feats]) == 0
    bot = torch.stack([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2)]).unsqueeze(0)  # 1x2x2x2
    g = fsp_matrix(bot, torch.full((1, 1, 1, 1), 2.0))  # bot pooled to 1x1: (2.5, 1)
    assert g.shape == (1, 1, 2) and torch.allclose(g, torch.tensor([[[5.0, 2.0]]]))
    loss = fsp_loss([bot, torch.full((1, 1, 1, 1), 2.0)], [bot, torch.ones(1, 1, 1, 1)])
    assert loss.item() == pytest.approx(((5 - 2.5) ** 2 + (2 - 1) ** 2) / 2)


def test_fsp_zero_on_identical_networks():
    t = build_model("resnet20", num_classes=10)
    d = _build("fsp", t, copy.deepcopy(t))
    d.eval()
    assert d.init_stages()[0].loss_fn(torch.randn(4, 3, 32, 32), None)["fsp"].item() == 0.0


def test_fsp_refuses_unequal_channels_naming_layers():
    with pytest.raises(MethodError, match=r"#1 teacher 'block1' 32 ch vs student 'block1' 16 ch"):
        _build("fsp", "wrn_40_2", "wrn_40_1")


# -- init stages: names, epochs, modules ------------------------------------------------------------------
def _student_params_except(d, prefixes):
    return {id(p) for n, p in d.student.named_parameters() if not n.startswith(tuple(prefixes))}


def test_fitnets_stages():
    assert _build("fitnets", "resnet56", "resnet20").init_stages() == []
    d = _build("fitnets", "resnet56", "resnet20", two_stage=True, init_epochs=7)
    (stage,) = d.init_stages()
    assert (stage.name, stage.epochs, stage.lr) == ("hint", 7, None)
    assert stage.extra["student_modules"] == ["conv1", "bn1", "relu", "layer1", "layer2"]
    assert _ids(stage.modules) == _ids([d.regressor]) | _student_params_except(d, ["layer3", "fc"])
    # any model: a plain Sequential's feat[2] is its 16x16 ReLU ("6"); everything up to it is trained
    d = _build("fitnets", "resnet20", plain_cnn(10, 3), two_stage=True)
    assert d.init_stages()[0].extra["student_modules"] == ["0", "1", "2", "3", "4", "5", "6"]


def test_ab_stage():
    d = _build("ab", "resnet56", "resnet20")
    (stage,) = d.init_stages()
    assert (stage.name, stage.epochs) == ("ab", 30)
    assert all(isinstance(c, nn.Identity) for c in d.connectors)  # same shapes: identity connectors
    assert _ids(stage.modules) == _student_params_except(d, ["fc"])
    d = _build("ab", "resnet32x4", "ShuffleV1", init_epochs=3)
    assert d.init_stages()[0].epochs == 3
    assert [type(c.conv) for c in d.connectors] == [nn.ConvTranspose2d] * 3  # 16→32, 8→16, 4→8
    assert _ids(d.init_stages()[0].modules) == _ids([d.connectors]) | _student_params_except(d, ["linear"])


def test_ft_stage_and_lr_rule():
    d = _build("ft", "resnet56", "resnet20")
    (stage,) = d.init_stages()
    assert (stage.name, stage.epochs, stage.lr) == ("paraphraser", 30, 0.01)  # resnet student: 0.01
    assert stage.modules == [d.paraphraser]
    names = [n for n, _ in d.trainable_named_parameters()]
    assert any(n.startswith("translator.") for n in names)
    assert not any(n.startswith(("paraphraser.", "teacher.")) for n in names)
    assert _build("ft", "vgg13", "MobileNetV2").init_stages()[0].lr is None  # base lr
    assert _build("ft", "resnet56", "resnet20", init_lr=0.05).init_stages()[0].lr == 0.05


def test_fsp_stage():
    d = _build("fsp", "wrn_40_2", "wrn_16_2", init_epochs=5)
    (stage,) = d.init_stages()
    assert (stage.name, stage.epochs) == ("fsp", 5)
    assert stage.extra["student_modules"] == ["conv1", "block1", "block2", "block3"]
    assert _ids(stage.modules) == _student_params_except(d, ["bn1", "fc"])


# -- a real step of every stage -----------------------------------------------------------------------------
CASES = [
    ("fitnets", "resnet56", "resnet20", {}),
    ("fitnets", "vgg13", "MobileNetV2", {}),
    ("fitnets", "ResNet50", "vgg8", {"two_stage": True, "kd_weight": 0.9, "ce_weight": 0.1}),
    ("fitnets", "wrn_40_2", "wrn_16_2", {"two_stage": True}),
    ("ab", "wrn_40_2", "wrn_16_2", {}),
    ("ab", "vgg13", "MobileNetV2", {}),
    ("ft", "resnet56", "resnet20", {}),
    ("ft", "resnet32x4", "ShuffleV1", {}),
    ("fsp", "resnet56", "resnet20", {}),
    ("fsp", "resnet56", "wrn_16_1", {}),  # cross-architecture with equal channels (16, 16, 32, 64)
]


def _changed(before, params):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params)]


@pytest.mark.parametrize("method,t_name,s_name,opts", CASES)
def test_real_steps_of_every_stage(method, t_name, s_name, opts):
    d = _build(method, t_name, s_name, **opts)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    teacher = list(d.teacher.parameters())
    # init stages, as the trainer runs them: its modes, an SGD over the stage's parameters only
    for stage in d.init_stages():
        _stage_modes(SimpleNamespace(distiller=d), stage)
        params = _parameters(stage)
        own = {id(p) for p in params}
        before = [p.detach().clone() for p in params]
        terms = stage.loss_fn(x, torch.arange(4))
        assert set(terms) == {stage.name} and torch.isfinite(terms[stage.name])
        d.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        reached = {id(p) for p in d.parameters() if p.grad is not None}
        assert reached and reached <= own, "the stage's loss reached parameters outside its modules"
        assert all(p.grad is None for p in teacher)
        for m in stage.modules:  # every trainable stage module gets a gradient
            assert not list(m.parameters()) or any(p.grad is not None for p in m.parameters())
        torch.optim.SGD(params, lr=0.01, momentum=0.9).step()
        assert any(_changed(before, params))
    # main stage
    d.train()
    assert not d.teacher.training
    if method == "ft":
        assert not d.paraphraser.training  # frozen for good once its stage is over
        para = [p.detach().clone() for p in d.paraphraser.parameters()]
    params = [p for _, p in d.trainable_named_parameters()]
    before = [p.detach().clone() for p in params]
    logits, terms = d(x, y)
    if method in ("ab", "fsp") or opts.get("two_stage"):  # main stage without the method term
        expected = {"ce", "kd"} if opts.get("kd_weight") else {"ce"}
    else:
        expected = {"ce", method}
    assert set(terms) == expected and logits.shape == (4, 10)
    assert all(torch.isfinite(v) for v in terms.values())
    d.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher)
    torch.optim.SGD(params, lr=0.01, momentum=0.9).step()
    assert all(c for c, p in zip(_changed(before, params), params) if p.grad is not None)
    if method == "ft":
        assert all(p.grad is None for p in d.paraphraser.parameters())
        assert all(torch.equal(a, b) for a, b in zip(para, d.paraphraser.parameters()))
        assert all(p.grad is not None for p in d.translator.parameters())
    if method in ("ab", "fsp") or opts.get("two_stage"):  # no method term: the auxiliary parts get nothing
        aux = [p for n, p in d.named_parameters() if n.startswith(("connectors.", "regressor."))]
        assert all(p.grad is None for p in aux)
