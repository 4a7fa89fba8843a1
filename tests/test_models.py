"""Tests of the model zoo: RepDistiller-compatible CIFAR models, ImageNet ResNets, small CNNs.

The CIFAR facts come from ``shared/reference/cifar_zoo_reference.json``. The parameter counts, feature shapes
and a SHA-256 digest of each ``[key, shape]`` list are embedded below so the tests run without that file; when
the file is found, the key lists are also compared entry by entry (clearer failure messages).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkd.errors import ModelError
from mimkd.features import FeatureTap
from mimkd.models import FeaturePoints, available, build_model, model_factory
from mimkd.models.layers import channel_shuffle

# name: (num_parameters for 100 classes, sha256(json [[key, shape], ...])[:16], is_feat_shapes for 3x32x32)
CIFAR_REFERENCE: dict[str, tuple[int, str, list[tuple[int, ...]]]] = {
    "resnet8": (83892, "8454cf760e88e282", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "resnet14": (181108, "9fe2d47f83b316b5", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "resnet20": (278324, "f9dffb5cd056d222", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "resnet32": (472756, "b8c084b09c3e7845", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "resnet44": (667188, "8f2eb9ffdc5da52f", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "resnet56": (861620, "a0b7f7cd4900c329", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "resnet110": (1736564, "9d552da9247104fa", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "resnet8x4": (
        1233540,
        "0b8003cb891e2402",
        [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    ),
    "resnet32x4": (
        7433860,
        "aecfcad6824123a5",
        [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    ),
    "ResNet50": (
        23705252,
        "54d081fac0265c06",
        [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)],
    ),
    "wrn_16_1": (180916, "a7ef59715312da46", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "wrn_16_2": (703284, "ed178d5242382ddb", [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]),
    "wrn_40_1": (569780, "1e65af2e365ab351", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]),
    "wrn_40_2": (
        2255156,
        "f50f409af9f63048",
        [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)],
    ),
    **{
        name: (n, digest, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)])
        for name, n, digest in [
            ("vgg8", 3965028, "ce35fd5c12ab155f"),
            ("vgg11", 9277284, "b3ec7411fc36322e"),
            ("vgg13", 9462180, "20ef2419bbf1b10a"),
            ("vgg16", 14774436, "a4f169502f98906b"),
            ("vgg19", 20086692, "3ff64c602411bb17"),
        ]
    },
    "MobileNetV2": (
        812836,
        "cccb917695b99fd6",
        [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)],
    ),
    "ShuffleV1": (
        949258,
        "71109132f0772d4e",
        [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)],
    ),
    "ShuffleV2": (
        1355528,
        "47ee01a49bb03be4",
        [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)],
    ),
}
CIFAR_NAMES = list(CIFAR_REFERENCE)
IMAGENET_NAMES = ["resnet18", "resnet34", "resnet50"]
SMALL_NAMES = ["conv4mp", "conv4mp_w32", "cnn_teacher"]


def _find_reference() -> dict | None:
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("MIMKD_REFERENCE_JSON", "")]
    for root in (here.parent, here.parent.parent):
        candidates.append(str(root / "shared" / "reference" / "cifar_zoo_reference.json"))
    for c in candidates:
        if c and Path(c).is_file():
            return json.loads(Path(c).read_text())
    return None


REFERENCE_JSON = _find_reference()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 forwards gain nothing from intra-op threads; on a busy 2-core box they cost 10-100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _classifier(model: nn.Module) -> nn.Module:
    emb = model.feature_points.embedding
    return model.get_submodule(emb[: -len(":input")]) if emb.endswith(":input") else model.fc


def _tap_eval(model: nn.Module, x: torch.Tensor):
    model.eval()
    tap = FeatureTap(model)
    with torch.no_grad():
        out, feats = tap.run(x)
    return out, feats


def _shapes(feats, points) -> list[tuple[int, ...]]:
    return [tuple(feats[p].shape[1:]) for p in points]


def test_registry_lists_every_model() -> None:
    assert set(CIFAR_NAMES + IMAGENET_NAMES + SMALL_NAMES) <= set(available())
    assert callable(model_factory("resnet8"))


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_state_dict_matches_reference(name: str) -> None:
    n_params, digest, _ = CIFAR_REFERENCE[name]
    model = build_model(name, num_classes=100)
    assert isinstance(model.feature_points, FeaturePoints)
    assert _n_params(model) == n_params
    layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    if REFERENCE_JSON is not None:
        assert REFERENCE_JSON[name]["num_parameters"] == n_params
        assert layout == REFERENCE_JSON[name]["state_dict"]  # every key, in order, with its shape
    assert hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()[:16] == digest
    # a checkpoint of the reference layout (equal to `layout`, by the digest) loads strictly
    gen = torch.Generator().manual_seed(0)
    ckpt = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            ckpt[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            ckpt[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            ckpt[key] = torch.randn(shape, generator=gen) * 0.05
    model.load_state_dict(ckpt, strict=True)
    assert all(torch.equal(v, ckpt[k]) for k, v in model.state_dict().items())
    out, _ = _tap_eval(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def _check_preact(name: str, model: nn.Module, feats) -> None:
    fp = model.feature_points
    for stage, pre in zip(fp.stages, fp.preact):
        if pre is None:
            continue
        s, p = feats[stage], feats[pre]
        assert s.shape == p.shape, (stage, pre)
        if name.startswith("wrn"):  # RepDistiller: WRN preact = next BatchNorm applied to the stage
            assert torch.allclose(model.get_submodule(pre)(s), p, atol=1e-6), pre
        elif name == "MobileNetV2":  # linear bottleneck outputs: preact list == normal list
            assert torch.equal(s, p)
        elif name == "ShuffleV2":  # preact = cat([x1, b]) before the channel shuffle
            assert torch.equal(channel_shuffle(F.relu(p), 2), s), pre
        else:
            assert torch.equal(F.relu(p), s), pre


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_feature_points(name: str) -> None:
    _, _, feat_shapes = CIFAR_REFERENCE[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=100)
    fp = model.feature_points
    out, feats = _tap_eval(model, torch.randn(2, 3, 32, 32))
    assert fp.has_stem and len(fp.maps) == len(fp.stages) - 1
    assert _shapes(feats, fp.stages) == feat_shapes[:-1]
    assert tuple(feats[fp.embedding].shape[1:]) == feat_shapes[-1]
    assert torch.allclose(_classifier(model)(feats[fp.embedding]), out, atol=1e-6)
    assert fp.preact[0] is None and all(p is not None for p in fp.preact[1:])
    _check_preact(name, model, feats)
    last, emb = feats[fp.stages[-1]], feats[fp.embedding]
    if name.startswith("wrn"):  # f3 is taken BEFORE the final BN-ReLU
        last = F.relu(feats[fp.preact[-1]])
    if name not in ("MobileNetV2", "ShuffleV2"):  # those two run a 1x1 conv before pooling
        assert torch.allclose(last.mean((2, 3)), emb, atol=1e-5)


# expected stage spatial sizes for a 1x28x28 input
SIZES_28 = {
    "resnet8": [28, 28, 14, 7],
    "resnet8x4": [28, 28, 14, 7],
    "wrn_16_2": [28, 28, 14, 7],
    "vgg8": [28, 14, 7, 3, 3],
    "MobileNetV2": [14, 14, 7, 4, 2],
    "ShuffleV1": [28, 14, 7, 4],
    "ShuffleV2": [28, 14, 7, 4],
    "ResNet50": [28, 28, 14, 7, 4],
}


@pytest.mark.parametrize("name", list(SIZES_28))
def test_cifar_models_take_one_channel_28x28(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1)
    out, feats = _tap_eval(model, torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert [feats[p].shape[-1] for p in model.feature_points.stages] == SIZES_28[name]
    assert _n_params(model) < CIFAR_REFERENCE[name][0]  # fewer stem weights and classes


def test_vgg_pools_before_block4_for_64x64_input() -> None:
    model = build_model("vgg8", num_classes=10)
    out, feats = _tap_eval(model, torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    assert [feats[p].shape[-1] for p in model.feature_points.stages] == [64, 32, 16, 8, 4]


IMAGENET_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
IMAGENET_KEYS = {"resnet18": 122, "resnet34": 218, "resnet50": 320}  # convs + 5 per BN + fc weight/bias


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_resnet_layout(name: str) -> None:
    model = build_model(name, num_classes=1000)
    assert _n_params(model) == IMAGENET_PARAMS[name]
    sd = model.state_dict()
    assert len(sd) == IMAGENET_KEYS[name]
    assert list(sd)[:2] == ["conv1.weight", "bn1.weight"] and list(sd)[-2:] == ["fc.weight", "fc.bias"]
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert "layer2.0.downsample.0.weight" in sd and "layer4.1.bn2.running_var" in sd
    assert ("layer1.0.conv3.weight" in sd) == (name == "resnet50")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnet_feature_shapes(name: str) -> None:
    model = build_model(name, num_classes=1000)
    out, feats = _tap_eval(model, torch.randn(1, 3, 224, 224))
    e = 4 if name == "resnet50" else 1
    fp = model.feature_points
    expected = [(64, 112, 112), (64 * e, 56, 56), (128 * e, 28, 28), (256 * e, 14, 14), (512 * e, 7, 7)]
    assert _shapes(feats, fp.stages) == expected
    assert _shapes(feats, fp.preact[1:]) == expected[1:]
    assert all(torch.equal(F.relu(feats[p]), feats[s]) for s, p in zip(fp.stages[1:], fp.preact[1:]))
    assert tuple(feats[fp.embedding].shape) == (1, 512 * e) and out.shape == (1, 1000)


def test_small_model_parameter_counts() -> None:
    # conv4mp (w=64, 1 channel, 10 classes): conv1 9*1*64 + BN 2*64 = 704; blocks 2-4: 3*(9*64*64 + 2*64)
    # = 3*36,992 = 110,976; fc 64*10 + 10 = 650; total 704 + 110,976 + 650 = 112,330
    assert _n_params(build_model("conv4mp", num_classes=10, in_channels=1)) == 112_330
    # conv4mp_w32: 9*32 + 64 = 352; 3*(9*32*32 + 64) = 27,840; fc 32*10 + 10 = 330; total 28,522
    assert _n_params(build_model("conv4mp_w32", num_classes=10, in_channels=1)) == 28_522
    # conv4mp, 3 channels, 100 classes: 9*3*64 + 128 = 1,856; 110,976; fc 6,500; total 119,332
    assert _n_params(build_model("conv4mp", num_classes=100, in_channels=3)) == 119_332
    # cnn_teacher: conv 9*1*32 + BN 64 = 352; 9*32*64 + 128 = 18,560; 9*64*128 + 256 = 73,984;
    # hidden 6272*128 + 128 = 802,944; fc 128*10 + 10 = 1,290; total 897,130
    assert _n_params(build_model("cnn_teacher", num_classes=10, in_channels=1)) == 897_130


@pytest.mark.parametrize(
    ("name", "stages", "embedding"),
    [
        ("conv4mp", [(64, 28, 28), (64, 14, 14), (64, 7, 7), (64, 3, 3)], (64,)),
        ("conv4mp_w32", [(32, 28, 28), (32, 14, 14), (32, 7, 7), (32, 3, 3)], (32,)),
        ("cnn_teacher", [(32, 28, 28), (64, 14, 14), (128, 7, 7)], (128,)),
    ],
)
def test_small_model_feature_shapes(name: str, stages, embedding) -> None:
    model = build_model(name, num_classes=10, in_channels=1)
    fp = model.feature_points
    assert fp.has_stem and fp.maps == fp.stages[1:]  # the first conv-BN-ReLU is the stem, as in the zoo
    out, feats = _tap_eval(model, torch.randn(2, 1, 28, 28))
    assert _shapes(feats, fp.stages) == stages and tuple(feats[fp.embedding].shape[1:]) == embedding
    assert torch.allclose(model.fc(feats[fp.embedding]), out, atol=1e-6)
    out32, _ = _tap_eval(model, torch.randn(2, 1, 32, 32))  # other input sizes work too
    assert out32.shape == (2, 10)


def test_cnn_teacher_embedding_is_taken_before_dropout() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_teacher", num_classes=10, in_channels=1).train()
    tap = FeatureTap(model, points=[model.feature_points.embedding, "fc:input"])
    _, feats = tap.run(torch.randn(4, 1, 28, 28))
    emb, fc_in = feats[model.feature_points.embedding], feats["fc:input"]
    kept = fc_in != 0
    assert (emb > 0).any() and kept.sum() < (emb > 0).sum()  # dropout removed some active units
    assert torch.allclose(fc_in[kept], emb[kept] / 0.7, atol=1e-6)


def test_unknown_model_suggests_a_name() -> None:
    with pytest.raises(ModelError, match="resnet8x4"):
        build_model("resnet8x5")


def _train_input(name: str) -> torch.Tensor:
    if name in SMALL_NAMES:
        return torch.randn(2, 1, 28, 28)
    return torch.randn(2, 3, 16, 16)  # small but keeps >1 value per BN channel everywhere


@pytest.mark.parametrize("name", CIFAR_NAMES + IMAGENET_NAMES + SMALL_NAMES)
def test_training_step_through_all_features(name: str) -> None:
    """No in-place op invalidates a captured feature, and every parameter gets a gradient."""
    x = _train_input(name)
    model = build_model(name, num_classes=10, in_channels=x.shape[1]).train()
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    tap = FeatureTap(model)
    out, feats = tap.run(x)
    fp = model.feature_points
    assert set(feats) == {*fp.stages, *(p for p in fp.preact if p), fp.embedding}
    loss = F.cross_entropy(out, torch.tensor([0, 1])) + sum(f.square().mean() for f in feats.values())
    loss.backward()
    tap.features  # noqa: B018 - re-checks the version counters after backward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
