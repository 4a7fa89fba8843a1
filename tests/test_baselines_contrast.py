"""VID and CRD (docs/methods/vid.md, crd.md): closed-form oracles, hand-computed values, bank updates,
a real step per method, pair."""

from __future__ import annotations

import math

import pytest
import torch

import mimkd
from mimkd.distillers.crd import CRD, CRDKD, Embed
from mimkd.distillers.vid import VIDHead, vid_log_scale_init, vid_loss, vid_variance
from mimkd.errors import MethodError
from mimkd.mi.bounds import crd_nce_loss
from mimkd.mi.contrast import BankContrast
from mimkd.models import build_model

LN5_HALF = 0.8047190  # closed form: VID at init, zero regressor output and zero target, per pair
CRD_UNIFORM = 10.7040910  # closed form: CRD-NCE, one direction, every P = 1/N, K = 16384, eps = 0
CRD_UNIFORM_EPS = 10.7090910  # same with eps = 1e-7 and N = 50,000

SAME_FAMILY = ("resnet56", "resnet20")
CROSS_ARCH = ("vgg13", "MobileNetV2")


def _pair(t_name, s_name, classes=100):
    torch.manual_seed(0)
    return build_model(t_name, num_classes=classes), build_model(s_name, num_classes=classes)


def _distiller(method, t_name, s_name, n_train=256, **opts):
    t, s = _pair(t_name, s_name)
    x = torch.randn(2, 3, 32, 32)
    if method.startswith("crd"):
        opts = {"num_negatives": 32, **opts}
        return mimkd.build_distiller(
            method, s, t, x, num_classes=100, train_labels=torch.arange(n_train) % 100, **opts
        )
    return mimkd.build_distiller(method, s, t, x, num_classes=100, **opts)


# ------------------------------------------------------------------------------------------------------ VID
def test_vid_variance_is_exactly_five_at_init_and_half_ln5_per_pair():
    head = VIDHead(8, 6)
    torch.testing.assert_close(head.variance(), torch.full((6,), 5.0), atol=1e-6, rtol=0)
    zero = torch.zeros(2, 6, 4, 4)
    assert float(vid_loss(zero, zero, head.log_scale).detach()) == pytest.approx(LN5_HALF, abs=1e-6)
    # through the distiller: regressors output 0 (last conv zeroed), teacher maps 0 -> 0.5·ln5 per pair
    d = _distiller("vid", *CROSS_ARCH)
    for h in d.heads:
        torch.nn.init.zeros_(h.regressor[-1].weight)
    x = torch.randn(4, 3, 32, 32)
    _, fs, t_logits, ft = d.run_both(x)
    ft = {k: torch.zeros_like(v) for k, v in ft.items()}
    loss = d.method_loss(fs, ft, None, t_logits, None)
    assert len(d.pairs) == 4  # vgg13 and MobileNetV2 both have four stage outputs in feat[1:-1]
    assert float(loss.detach()) == pytest.approx(4 * LN5_HALF, abs=1e-5)


def test_vid_loss_hand_computed():
    # channel 0: σ² = 1, μ − t = 1 -> 0.5·(1 + 0); channel 1: σ² = 4, μ − t = 2 -> 0.5·(1 + ln 4)
    log_scale = torch.tensor([vid_log_scale_init(1.0), vid_log_scale_init(4.0)])
    torch.testing.assert_close(vid_variance(log_scale), torch.tensor([1.0, 4.0]))
    mean = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    target = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    expected = (0.5 + 0.5 * (1.0 + math.log(4.0))) / 2  # = 0.8465736
    assert float(vid_loss(mean, target, log_scale)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.8465736, abs=1e-7)
    with pytest.raises(MethodError, match="shape"):
        vid_loss(mean, target[:, :1], log_scale)


def test_vid_loss_matches_elementwise_formula_and_its_gradients():
    def naive(mean, target, log_scale):
        var = (torch.nn.functional.softplus(log_scale) + 1e-5).view(1, -1, *([1] * (mean.dim() - 2)))
        return (0.5 * ((mean - target).pow(2) / var + torch.log(var))).mean()

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4, 5, 6), (3, 4)]:
        args = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        log_scale = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
        got, want = vid_loss(*args, log_scale), naive(*args, log_scale)
        torch.testing.assert_close(got, want)
        grads = torch.autograd.grad(got, [*args, log_scale])
        torch.testing.assert_close(grads, torch.autograd.grad(want, [*args, log_scale]))
        assert torch.autograd.gradcheck(lambda m, t, s: vid_loss(m, t, s), (*args, log_scale))
    # low-precision maps (autocast): the difference is taken in bf16, its squares are summed in float32
    m = torch.randn(2, 3, 4, 4, generator=g).bfloat16().requires_grad_()
    t = torch.randn(2, 3, 4, 4, generator=g).bfloat16()
    low = vid_loss(m, t, torch.zeros(3))
    assert low.dtype == torch.float32
    diff = (m.detach() - t).float()
    torch.testing.assert_close(low.detach(), vid_loss(diff, torch.zeros_like(diff), torch.zeros(3)))
    low.backward()
    assert m.grad.dtype == torch.bfloat16 and torch.isfinite(m.grad.float()).all()


def test_vid_regressor_layout_and_pooling():
    d = _distiller("vid", "resnet32x4", "ShuffleV1")  # maps 32/16/8 vs 16/8/4: every pair is pooled
    head = d.heads[0]
    convs = [m for m in head.regressor if isinstance(m, torch.nn.Conv2d)]
    t_point, s_point = d.pairs[0]
    c_t, c_s = d.t_specs[t_point].channels, d.s_specs[s_point].channels
    assert [(c.in_channels, c.out_channels) for c in convs] == [(c_s, c_t), (c_t, c_t), (c_t, c_t)]
    assert all(c.bias is None and c.kernel_size == (1, 1) for c in convs)
    assert len(head.regressor) == 5  # conv, ReLU, conv, ReLU, conv
    assert d.options.weight == 1.0 and d.options.ce_weight == 1.0 and d.options.kd_weight == 0.0


# ------------------------------------------------------------------------------------------------------ CRD
def test_crd_nce_uniform_scores_oracle():
    k, n = 16384, 50000
    pos, neg = (
        torch.full((3,), 1.0 / n, dtype=torch.float64),
        torch.full((3, k), 1.0 / n, dtype=torch.float64),
    )
    assert float(crd_nce_loss(pos, neg, n, eps=0.0)) == pytest.approx(CRD_UNIFORM, abs=1e-6)
    assert float(crd_nce_loss(pos, neg, n, eps=1e-7)) == pytest.approx(CRD_UNIFORM_EPS, abs=1e-6)


def test_crd_uniform_scores_through_the_bank_and_the_distiller():
    # all bank rows 0 -> every score exp(0)/Z with Z = mean·N -> P = 1/N exactly; two directions
    labels = torch.arange(50000) % 100
    contrast = BankContrast(labels, 128, 16384, 0.07, 0.5, loss="nce")
    contrast.bank_student.memory.zero_()
    contrast.bank_teacher.memory.zero_()
    z = torch.nn.functional.normalize(torch.randn(2, 128), dim=1)
    loss, _ = contrast(z, z.flip(0), torch.tensor([5, 20001]))
    assert float(loss) == pytest.approx(2 * CRD_UNIFORM_EPS, abs=2e-4)  # float32 sum over 16385 logs
    # the registered method with its defaults (K = 16384, τ = 0.07, β = 0.8) on a CIFAR-100-sized bank
    t, s = _pair("resnet20", "resnet8")
    d = mimkd.build_distiller("crd", s, t, torch.randn(2, 3, 32, 32), train_labels=labels)
    assert d.contrast.num_negatives == 16384 and d.contrast.temperature == 0.07
    assert d.contrast.bank_student.momentum == 0.5 and d.contrast.num_samples == 50000
    d.contrast.bank_student.memory.zero_()
    d.contrast.bank_teacher.memory.zero_()
    _, terms = d(torch.randn(4, 3, 32, 32), torch.arange(4), torch.tensor([0, 1, 2, 49999]))
    assert float(terms["crd"].detach()) == pytest.approx(0.8 * 2 * CRD_UNIFORM_EPS, abs=4e-4)


def test_crd_nce_hand_computed():
    # B = 1, K = 2, N = 4 -> noise K/N = 0.5; P_0 = 0.5, P_k = (0.25, 0.5), eps = 0:
    # -[log(0.5/1) + log(0.5/0.75) + log(0.5/1)] = ln 2 + ln 1.5 + ln 2 = ln 6
    loss = crd_nce_loss(torch.tensor([0.5]), torch.tensor([[0.25, 0.5]]), 4, eps=0.0)
    assert float(loss) == pytest.approx(math.log(6.0), abs=1e-6)


def test_bank_contrast_nce_hand_computed_and_rows_unit_norm_after_update():
    # N = 4, classes [0, 1, 0, 1], K = 2: the negatives of sample 0 are exactly {1, 3}; τ = 1, D = 2
    labels = torch.tensor([0, 1, 0, 1])
    c = BankContrast(labels, dim=2, num_negatives=2, temperature=1.0, momentum=0.5, loss="nce")
    m_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    m_s = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    c.bank_teacher.memory.copy_(m_t)
    c.bank_student.memory.copy_(m_s)
    z_s, z_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])

    def direction(scores):  # column 0 positive; Z = mean(exp(scores))·N fixed at this first call
        e = [math.exp(v) for v in scores]
        z_const = sum(e) / len(e) * 4
        p = [v / z_const for v in e]
        noise = 2 / 4
        return -(
            math.log(p[0] / (p[0] + noise + 1e-7)) + sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
        )

    # student anchor vs teacher bank rows (0 | 1, 3): scores (1 | 0, 1);
    # teacher anchor vs student bank rows (0 | 1, 3): scores (1 | 0, 1)
    expected = direction([1.0, 0.0, 1.0]) + direction([1.0, 0.0, 1.0])
    loss, _ = c(z_s, z_t, torch.tensor([0]))
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    # momentum update of the touched row, re-normalised; the other rows untouched
    new_t = torch.nn.functional.normalize(0.5 * m_t[0] + 0.5 * z_t[0], dim=0)
    torch.testing.assert_close(c.bank_teacher.memory[0], new_t)
    torch.testing.assert_close(c.bank_teacher.memory[1:], m_t[1:])
    # rows of a random (non-normalised) bank become unit-norm after one update
    c2 = BankContrast(torch.arange(256) % 10, dim=16, num_negatives=8, loss="nce")
    idx = torch.tensor([3, 17, 200])
    assert not torch.allclose(c2.bank_student.memory[idx].norm(dim=1), torch.ones(3))
    z = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    c2(z, z.roll(1, 0), idx)
    for bank in (c2.bank_student, c2.bank_teacher):
        torch.testing.assert_close(bank.memory[idx].norm(dim=1), torch.ones(3))


def test_crd_options_weights_and_errors():
    d = _distiller("crd", "resnet20", "resnet8")
    o = d.options
    assert (o.ce_weight, o.kd_weight, o.weight) == (1.0, 0.0, 0.8)
    assert (o.feat_dim, o.num_negatives, o.temperature, o.momentum) == (128, 32, 0.07, 0.5)
    assert isinstance(d.embed_s, Embed) and d.embed_s.linear.out_features == 128
    assert isinstance(d.contrast, BankContrast) and d.contrast.loss_kind == "nce"
    assert d.contrast.directions == "both"
    assert d.embed_t.linear.in_features == 64 and d.embed_s.linear.in_features == 64
    dk = _distiller("crd+kd", "resnet20", "resnet8", feat_dim=16, temperature=0.1, momentum=0.9)
    assert isinstance(dk, CRDKD) and isinstance(dk, CRD)
    assert (dk.options.ce_weight, dk.options.kd_weight, dk.options.weight) == (1.0, 1.0, 0.8)
    assert dk.contrast.bank_teacher.dim == 16 and dk.contrast.temperature == 0.1
    _, terms = dk(torch.randn(4, 3, 32, 32), torch.arange(4), torch.arange(4))
    assert set(terms) == {"ce", "kd", "crd"}
    t, s = _pair("resnet20", "resnet8")
    with pytest.raises(MethodError, match="train_labels"):
        mimkd.build_distiller("crd", s, t, torch.randn(2, 3, 32, 32))
    with pytest.raises(MethodError, match="index"):
        d(torch.randn(4, 3, 32, 32), torch.arange(4), None)


# ------------------------------------------------------------------------------------------- real steps
@pytest.mark.parametrize("pair", [SAME_FAMILY, CROSS_ARCH], ids=["same_family", "cross_arch"])
@pytest.mark.parametrize("method", ["vid", "crd", "crd+kd"])
def test_one_real_step_grads_reach_student_and_heads_never_teacher(method, pair):
    d = _distiller(method, *pair).train()
    assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())
    names = [n for n, _ in d.trainable_named_parameters()]
    assert names and not any(n.startswith("teacher.") for n in names)
    heads = [d.heads] if method == "vid" else [d.embed_s, d.embed_t]
    opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.01, momentum=0.9)
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.student.named_parameters()}
    banks = [] if method == "vid" else [d.contrast.bank_student, d.contrast.bank_teacher]
    banks_before = [b.memory.clone() for b in banks]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 100, (6,), generator=g)
    index = torch.randperm(256, generator=g)[:6]
    _, terms = d(x, y, index)
    assert all(torch.isfinite(v) for v in terms.values())
    method_term = "vid" if method == "vid" else "crd"
    opt.zero_grad(set_to_none=True)
    terms[method_term].backward(retain_graph=True)  # the method term alone reaches student and heads
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    for module in heads:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    opt.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    opt.step()
    assert any(not torch.equal(p, student_before[n]) for n, p in d.student.named_parameters())
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # weights and BN statistics
    for before, bank in zip(banks_before, banks):
        changed = (bank.memory != before).any(dim=1)
        assert torch.equal(changed.nonzero().flatten().sort().values, index.sort().values)
        torch.testing.assert_close(bank.memory[index].norm(dim=1), torch.ones(6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_crd_and_vid_step_on_gpu():
    for method in ("crd", "vid"):
        d = _distiller(method, *SAME_FAMILY).cuda().train()
        x, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 100, (4,), device="cuda")
        _, terms = d(x, y, torch.arange(4, device="cuda"))
        sum(terms.values()).backward()
        assert all(torch.isfinite(v) for v in terms.values())
