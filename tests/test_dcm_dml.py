"""DML (docs/methods/dml.md) and DCM (docs/methods/dcm.md): loss oracles, gradient flow, the auxiliary
heads of every zoo family, a real training step, and real CLI runs on Fashion-MNIST with resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from foreign_models import plain_cnn
from mimkd.config import build_config
from mimkd.distillers import build_distiller, validate_options
from mimkd.distillers.dcm import DCM, dcm_kl, dcm_kl_terms, dcm_losses
from mimkd.distillers.dcm_heads import SUPPORTED_FAMILIES, APFCHead, build_aux_heads
from mimkd.distillers.dml import DML, dml_kl, dml_losses
from mimkd.engine.setup import run
from mimkd.errors import ConfigError, MethodError
from mimkd.features import FeatureTap
from mimkd.models import build_model
from mimkd.models.cifar_resnet_bottleneck import CifarResNetV2
from mimkd.models.mobilenetv2 import InvertedResidual, MobileNetV2
from mimkd.models.wrn import NetworkBlock, WideResNet

from helpers import SMALL_RUN, needs_fmnist, run_cli


@pytest.fixture(autouse=True)
def _one_thread():  # two threads per process oversubscribe a shared 2-core machine: several times slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KL_HAND = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([.75, .25] ‖ [.5, .5]) = 0.1308120


# -- losses -------------------------------------------------------------------------------------------------
def test_kl_hand_computed_values():
    target, logits = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    assert abs(KL_HAND - 0.1308120) < 1e-7
    assert dml_kl(target, logits).item() == pytest.approx(KL_HAND, abs=1e-6)
    # DCM's smoothed probabilities p̃ = (p + 1e-8)/(1 + C·1e-8), computed here in float64
    pt, ps = ((torch.tensor(p, dtype=torch.float64) + 1e-8) / (1 + 2e-8) for p in ([0.75, 0.25], [0.5, 0.5]))
    exact = float((pt * (pt / ps).log()).sum())
    assert dcm_kl(target, logits).item() == pytest.approx(exact, abs=1e-6)
    assert dcm_kl(target.repeat(3, 1), logits.repeat(3, 1)).item() == pytest.approx(exact, abs=1e-6)  # mean_b


def test_identical_outputs_give_exactly_zero_kl():
    z = torch.randn(5, 10)
    for k in (2, 3):
        terms = dml_losses([z.clone() for _ in range(k)], torch.zeros(5, dtype=torch.long))
        assert all(terms[f"kl.net{i + 1}"].item() == 0.0 for i in range(k))
    same = [z.clone() for _ in range(3)]
    kl = dcm_kl_terms(same, [t.clone() for t in same])
    assert len(kl) == 18 and all(v.item() == 0.0 for v in kl.values())
    losses = dcm_losses(same, [t.clone() for t in same], torch.zeros(5, dtype=torch.long))
    assert losses["kl_same_stage"].item() == 0.0 and losses["kl_cross_stage"].item() == 0.0
    # identical networks whose three classifiers differ: same-stage terms vanish, cross-stage ones do not
    outs = [torch.randn(5, 10) for _ in range(3)]
    kl = dcm_kl_terms(outs, [t.clone() for t in outs])
    for key, v in kl.items():
        left, right = key.split("<-")
        assert (v.item() == 0.0) == (left.split(".")[1] == right.split(".")[1]), key


def test_dcm_has_18_cross_network_terms_and_weights():
    a, b = [torch.randn(4, 7) for _ in range(3)], [torch.randn(4, 7) for _ in range(3)]
    kl = dcm_kl_terms(a, b)
    assert len(kl) == 18 and len(set(kl)) == 18
    for key in kl:
        left, right = key.split("<-")
        assert {left.split(".")[0], right.split(".")[0]} == {"net1", "net2"}, key  # never within a network
    same = [k for k in kl if k.split("<-")[0][-2:] == k.split("<-")[1][-2:]]
    assert len(same) == 6
    assert kl["net1.C3<-net2.C2"].item() == pytest.approx(dcm_kl(b[1], a[0]).item())
    y = torch.randint(0, 7, (4,))
    base = dcm_losses(a, b, y)
    cross = sum(v.item() for k, v in kl.items() if k not in same)
    assert base["kl_same_stage"].item() == pytest.approx(sum(kl[k].item() for k in same), rel=1e-6)
    assert base["kl_cross_stage"].item() == pytest.approx(cross, rel=1e-6)
    ce = sum(nn.functional.cross_entropy(z, y) for z in (a[2], b[2]))
    assert base["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    w = dcm_losses(a, b, y, ce_aux_weight=0.5, kl_same_stage_weight=2.0, kl_cross_stage_weight=0.0)
    assert w["ce_aux"].item() == pytest.approx(0.5 * base["ce_aux"].item(), rel=1e-6)
    assert w["kl_same_stage"].item() == pytest.approx(2 * base["kl_same_stage"].item(), rel=1e-6)
    assert w["kl_cross_stage"].item() == 0.0


def test_dml_peer_average_and_detached_peer():
    z = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (6,))
    summed, averaged = dml_losses(z, y), dml_losses(z, y, peer_average=True)
    assert averaged["kl.net1"].item() == pytest.approx(summed["kl.net1"].item() / 2, rel=1e-6)
    summed["kl.net1"].backward()
    assert z[0].grad is not None and z[0].grad.abs().sum() > 0
    assert z[1].grad is None and z[2].grad is None  # the peers' predictions are constants


def test_dcm_kl_term_of_net1_gives_no_gradient_to_net2():
    torch.manual_seed(0)
    d = build_distiller(
        "dcm", build_model("resnet8", 10, 3), None, torch.randn(4, 3, 32, 32), student_arch="resnet8"
    )
    outs1, outs2 = d.outputs(torch.randn(4, 3, 32, 32))
    dcm_kl_terms(outs1, outs2)["net1.C3<-net2.C2"].backward()
    assert all(p.grad is None for p in d.peers.parameters())
    assert all(p.grad is None for p in d.heads[1].parameters())
    assert all(p.grad is None for p in d.heads[0]["C2"].parameters())
    assert d.heads[0]["C3"].fc.weight.grad.abs().sum() > 0 and d.student.conv1.weight.grad.abs().sum() > 0


# -- auxiliary heads ----------------------------------------------------------------------------------------
def _case(family: str, arch: str, shape: tuple[int, int], sizes: tuple[int, int], gap: str = "avgpool:input"):
    """(family, model factory, input (channels, size), C3/C2 branch sizes, the global-pool input)."""
    make = (lambda: CifarResNetV2((1, 1, 1, 1), 10)) if arch == "cifar_bottleneck_1111" else None
    make = make or (lambda: build_model(arch, 10, shape[0]))
    return pytest.param(family, make, shape, sizes, gap, id=arch)


FAMILY_CASES = [
    _case("cifar_resnet", "resnet8", (3, 32), (32, 16)),
    _case("cifar_resnet_bottleneck", "cifar_bottleneck_1111", (3, 32), (16, 8)),  # a small ResNet50 sibling
    _case("wrn", "wrn_16_1", (3, 32), (32, 16)),
    _case("vgg", "vgg8", (3, 32), (16, 8), "pool4:input"),
    _case("mobilenetv2", "MobileNetV2", (3, 32), (4, 2)),
    _case("shufflenetv1", "ShuffleV1", (3, 32), (16, 8)),
    _case("shufflenetv2", "ShuffleV2", (3, 32), (16, 8)),
    _case("imagenet_resnet", "resnet18", (3, 64), (8, 4)),
    _case("small", "conv4mp_w32", (1, 28), (14, 7)),
    _case("small", "cnn_teacher", (1, 28), (28, 14), "pool3:input"),
]


@pytest.mark.parametrize(("family", "make", "shape", "sizes", "gap"), FAMILY_CASES)
def test_aux_heads_every_family(family, make, shape, sizes, gap):
    assert {c.values[0] for c in FAMILY_CASES} == set(SUPPORTED_FAMILIES)  # every family has a case
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, shape[0], shape[1], shape[1])
    aux = build_aux_heads(model, 10, x)
    assert aux.family == family and set(aux.heads) == {"C3", "C2"}
    tap = FeatureTap(model, [*aux.points.values(), gap])
    with torch.no_grad():
        logits, feats = tap.run(x)
        final = feats[gap].shape[-2:]
        for c, size in zip(("C3", "C2"), sizes):
            f = feats[aux.points[c]]
            assert f.shape[-2:] == (size, size), c  # C3 branches one stage before C2
            head = aux.heads[c].eval()
            assert head.feature_map(f).shape[-2:] == final, c  # same down-sampling as the backbone
            assert head(f).shape == logits.shape == (2, 10)
    tap.remove()


def _blocks(body: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in body:
        out += list(m.layer) if isinstance(m, NetworkBlock) else [m]
    return out


def test_aux_heads_follow_the_papers_rows():
    """DCM's auxiliary heads (docs/methods/dcm.md), meta device: ResNet-110, WRN-28-4/10, ResNet-18/50."""
    with torch.device("meta"):

        def heads(model, size):
            return build_aux_heads(model, 100, torch.empty(2, 3, size, size)).heads

        h = heads(build_model("resnet110", 100, 3), 32)
        assert [b.conv2.out_channels for b in _blocks(h["C3"].body)] == [32] * 9 + [64] * 9
        assert [b.conv2.out_channels for b in _blocks(h["C2"].body)] == [128] * 18
        for w, (a, b, c) in ((4, (128, 256, 512)), (10, (320, 640, 1280))):
            h = heads(WideResNet(28, w, 100), 32)
            assert [x.conv2.out_channels for x in _blocks(h["C3"].body)] == [a] * 4 + [b] * 2
            assert [x.conv2.out_channels for x in _blocks(h["C2"].body)] == [c] * 4
            assert isinstance(h["C2"].final[0], nn.BatchNorm2d)  # WRN's final BN-ReLU
        h = heads(build_model("resnet18", 1000, 3), 224)
        assert [b.conv2.out_channels for b in h["C3"].body] == [256, 512, 512]
        assert [b.conv2.out_channels for b in h["C2"].body] == [1024, 1024]
        h = heads(build_model("resnet50", 1000, 3), 224)
        c3, c2 = ([(b.conv2.out_channels, b.conv3.out_channels) for b in h[c].body] for c in ("C3", "C2"))
        assert c3 == [(256, 1024)] * 3 + [(512, 2048)] * 2 and c2 == [(1024, 4096)] * 3
        h = heads(MobileNetV2(T=6, width_mult=1.0, num_classes=100), 224)
        c3, c2 = (  # (t, c, s) of each inverted residual, as in DCM's MobileNetV2 heads
            [(b.conv[0].out_channels // b.conv[0].in_channels, b.conv[-1].num_features, b.conv[3].stride[0])
             for b in h[c].body if isinstance(b, InvertedResidual)]
            for c in ("C3", "C2")
        )  # fmt: skip
        assert c3 == [(6, 160, 2), (6, 160, 1), (6, 160, 1), (3, 320, 1)] and c2 == [(6, 480, 1)]
        assert h["C3"].fc.in_features == 1280 and h["C2"].fc.in_features == 1920


def test_apfc_for_any_model_and_stages_refused_outside_the_families():
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(MethodError, match=r"aux_head=apfc") as e:
        build_aux_heads(plain_cnn(), 10, x)
    assert "cifar_resnet" in str(e.value) and "wrn" in str(e.value)
    aux = build_aux_heads(plain_cnn(), 10, x, "apfc")
    assert all(isinstance(h, APFCHead) for h in aux.heads.values())
    d = build_distiller(
        "dcm", plain_cnn(), None, x, num_classes=10, student_arch="foreign", aux_head="apfc",
        build_network=lambda arch: plain_cnn(),
    )  # fmt: skip
    logits, terms = d(x, torch.tensor([1, 2]))
    assert logits.shape == (2, 10) and set(terms) == {"ce", "ce_aux", "kl_same_stage", "kl_cross_stage"}
    with pytest.raises(ConfigError, match="aux_head"):
        validate_options("dcm", {"aux_head": "narrow"})


# -- the distillers -----------------------------------------------------------------------------------------
def test_dml_cohort_options_and_networks():
    x = torch.randn(2, 1, 28, 28)
    s = build_model("conv4mp_w32", 10, 1)
    assert not DML.requires_teacher and not DCM.requires_teacher
    with pytest.raises(MethodError, match=r"method\.peers"):
        build_distiller("dml", s, None, x)  # no student_arch, no peers
    with pytest.raises(MethodError, match="cohort_size"):
        build_distiller("dml", s, None, x, peers=["conv4mp"], cohort_size=3)
    with pytest.raises(ConfigError, match="unknown option"):
        validate_options("dml", {"peer": "resnet8"})
    d = build_distiller("dml", s, None, x, student_arch="conv4mp_w32", peers=["conv4mp", "conv4mp_w32"])
    assert list(d.networks()) == ["net1", "net2", "net3"] and d.networks()["net1"] is s
    assert [d.network_arch(n) for n in d.networks()] == ["conv4mp_w32", "conv4mp", "conv4mp_w32"]
    assert not torch.equal(s.block1[0].weight, d.peers[1].block1[0].weight)  # each its own random init
    names = {n for n, _ in d.trainable_named_parameters()}
    assert any(n.startswith("peers.0.") for n in names) and any(n.startswith("peers.1.") for n in names)
    assert any(k.startswith("peers.1.") for k in d.method_state_dict())
    logits, terms = d(x, torch.tensor([0, 1]))
    assert set(terms) == {f"{t}.net{i}" for t in ("ce", "kl") for i in (1, 2, 3)}
    assert set(d.metrics) == {"train_top1.net1", "train_top1.net2", "train_top1.net3"}
    assert len(build_distiller("dml", s, None, x, student_arch="conv4mp_w32", cohort_size=4).peers) == 3


def test_dcm_real_training_step_and_heads_outside_the_networks():
    torch.manual_seed(0)
    student, sample = build_model("resnet8", 10, 3), torch.randn(8, 3, 32, 32)
    d = build_distiller("dcm", student, None, sample, num_classes=10, student_arch="resnet8")
    fresh = set(build_model("resnet8", 10, 3).state_dict())
    assert set(d.student.state_dict()) == fresh and set(d.peers[0].state_dict()) == fresh
    assert {k.split(".")[0] for k in d.method_state_dict()} == {"peers", "heads"}
    info = d.describe()["networks"]
    assert info["net2"]["heads"]["C2"]["branch"] == "layer2"
    assert info["net1"]["heads"]["C3"]["params"] == sum(p.numel() for p in d.heads[0]["C3"].parameters())
    params = dict(d.trainable_named_parameters())
    assert {n.split(".")[0] for n in params} == {"student", "peers", "heads"}
    opt = torch.optim.SGD(params.values(), lr=0.05, momentum=0.9)
    y = torch.randint(0, 10, (8,))
    before = {n: p.detach().clone() for n, p in params.items()}
    losses = []
    d.train()
    for _ in range(4):
        logits, terms = d(sample, y)
        assert logits.shape == (8, 10) and set(terms) == {"ce", "ce_aux", "kl_same_stage", "kl_cross_stage"}
        assert all(t.item() > 0 for t in terms.values())
        total = sum(terms.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < losses[0]
    moved = {".".join(n.split(".")[:2]) for n, p in params.items() if not torch.equal(p, before[n])}
    assert {"student.conv1", "peers.0", "heads.0", "heads.1"} <= moved  # one optimiser moves them all
    assert len(d.metrics) == 6  # train accuracy of each network's C3, C2, C1


# -- real runs ----------------------------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.parametrize(
    ("method", "student", "steps"), [("dml", "conv4mp_w32", 37), ("dcm", "resnet8", 15)]
)  # a full epoch of 37 steps for DML; DCM (two resnet8 with heads) costs about 10x more a step
def test_cli_distill_without_teacher(tmp_path, method, student, steps):
    run_cli(
        "distill", "--method", method, "--student", student, *SMALL_RUN, "--threads", "1", "--epochs", "1",
        "--set", f"train.max_steps_per_epoch={steps}", "--out", str(tmp_path), "--name", "r",
    )  # fmt: skip
    r = tmp_path / "r"
    s = json.loads((r / "summary.json").read_text())
    assert s["status"] == "finished" and s["method"] == method and "teacher" not in s
    nets = s["networks"]
    assert list(nets) == ["net1", "net2"] and nets["net2"]["arch"] == student
    for net in nets.values():
        assert net["last"]["top1"] > 20.0 and net["best"]["top1"] == net["last"]["top1"]
    rec = json.loads((r / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["test.net2.top1"] == nets["net2"]["last"]["top1"]
    ck = torch.load(r / "best_net2.pt", map_location="cpu", weights_only=True)
    assert ck["arch"] == student and ck["network"] == "net2"
    build_model(student, 10, 1).load_state_dict(ck["model"], strict=True)
    last = torch.load(r / "last.pt", map_location="cpu", weights_only=True)
    build_model(student, 10, 1).load_state_dict(last["model"], strict=True)  # no head in the student
    assert any(k.startswith("peers.0.") for k in last["method_state"])


def _cfg(tmp_path, method: str, student: str, name: str):
    return build_config(
        {
            "seed": 5, "threads": 1, "out_dir": str(tmp_path), "name": name,
            "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.02},
            "student": {"arch": student}, "method": {"name": method},
            "optim": {"epochs": 2, "batch_size": 16, "lr": 0.05},
            "train": {"progress": False, "tensorboard": False, "checkpoint_every_steps": 2,
                      "max_steps_per_epoch": 3},
        }
    )  # fmt: skip


class _Crash(RuntimeError):
    pass


@needs_fmnist
@pytest.mark.parametrize(("method", "student"), [("dml", "conv4mp_w32"), ("dcm", "resnet8")])
def test_resume_mid_run_is_bit_identical(tmp_path, monkeypatch, method, student):
    cls = DML if method == "dml" else DCM
    ref = run(_cfg(tmp_path, method, student, "ref"))
    assert ref["status"] == "finished"
    calls, compute = [0], cls.compute

    def crashing(self, *a, **k):
        calls[0] += 1
        # call 1 is the pre-run probe of the method (a copy); call 7 is epoch 2, step 3 (3 steps an epoch):
        # last.pt holds epoch 2, step 2
        if calls[0] == 7:
            raise _Crash
        return compute(self, *a, **k)

    monkeypatch.setattr(cls, "compute", crashing)
    with pytest.raises(_Crash):
        run(_cfg(tmp_path, method, student, "cut"))
    ck = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 2)  # resumes inside epoch 2
    monkeypatch.setattr(cls, "compute", compute)
    resumed = run(_cfg(tmp_path, method, student, "cut"), resume=True)
    assert resumed["networks"]["net2"]["last"] == ref["networks"]["net2"]["last"]
    a = torch.load(tmp_path / "ref" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "method_state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after the resume"
