"""DCM's auxiliary classifiers C3 and C2, one rule per architecture family.

Yao & Sun, *Knowledge Transfer via Dense Cross-Layer Mutual-Distillation* (ECCV 2020), with the head
designs of its supplementary material; the method page is ``docs/methods/dcm.md``.

Placement rule: an auxiliary branches from a stage output and re-implements the remaining stages with the
backbone's own block type (own weights, other width/depth), so every input→classifier path has the same number
of down-sampling steps; then the backbone's final BN-ReLU where it has one, global average pooling and
``FC(num_classes)``. C2 branches from the second-to-last resolution stage and re-implements the last one; C3
branches from the stage before and re-implements the last two. ``n_i`` is the backbone's block count of stage
``i``, ``w_i`` its width; ``⌈n/2⌉`` halves a stage's depth:

==================  ============  =====================================  ==================================
family              C3 / C2 from  C3 re-implements                       C2 re-implements
==================  ============  =====================================  ==================================
CIFAR ResNet        layer1/2      [w2]×⌈n/2⌉, [w3]×⌈n/2⌉ (ResNet-110)    [2·w3]×n
CIFAR ResNet50      layer2/3      [w3]×⌈n3/2⌉, [w4]×⌈n4/2⌉ (ResNet-164)  [2·w4]×n4 (bottleneck planes)
WRN                 block1/2      [w2]×n, [w3]×n/2; final BN-ReLU        [2·w3]×n; final BN-ReLU
VGG, Conv4-MP, CNN  by probing    pool + every block at ⌈convs/2⌉, w     pool + every block, 2·w
MobileNetV2         blocks.4/5    (T,c5,n5,2), (T/2,c6,1,1), 1x1→1280    (T,1.5·c6,1,1), 1x1→1.5·1280
ShuffleV1           layer1/2      [w2]×⌈n2/2⌉, [w3]×⌈n3/2⌉ units         [2·w3]×n3 units
ShuffleV2           layer1/2      down+⌈n2/2⌉, down+⌈n3/2⌉, 1x1→1024    down+n3 at 2·w3, 1x1→1536
ImageNet ResNet     layer2/3      [w3]×⌈n3/2⌉, [w4]×min(n4, 2)           [2·w4]×n4
==================  ============  =====================================  ==================================

The ImageNet rule reproduces both of the paper's ImageNet rows (ResNet-18: 1 and 2 blocks; ResNet-50: 3 and 2)
and gives 3 and 2 for ResNet-34; the CIFAR ResNet50 rule coincides with the ImageNet ResNet-50 row.
MobileNetV2 follows its own row of the paper (C3 branches before the last down-sampling stage, C2 after
it); channel counts come from the model, so they scale with its width multiplier, and the 1x1 conv widths
follow the backbone's ``last_channel``. Plain conv stacks (VGG, Conv4-MP, cnn_teacher) are grouped into
resolution stages by one probe batch over their declared stage points; each re-implemented stage starts with
the 2x2 max-pool the backbone applies before it (VGG's 64x64 rule included), and a head ends with a max-pool
when its backbone runs one after its last stage (Conv4-MP). Heads use bias-free convolutions + BN and the
zoo's fan-out initialisation. Families the paper does not list get this toolkit's choice of shapes
(``docs/methods/dcm.md``, Deviations).

Which rule applies is a fact the model declares: a zoo model class carries ``family`` (a class attribute, e.g.
``"cifar_resnet"``) and :data:`HEAD_RULES` maps each family to its rule; this module never looks at a model's
class. A model that declares no known family gets :data:`FALLBACK_RULE`: ``aux_head="apfc"`` (the paper's
ablation head, ``AdaptiveAvgPool2d(4)`` + FC) with branch points at the last maps of the second- and
third-to-last resolutions found by :func:`mimkd.features.feature_points_of`; ``aux_head="stages"`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from mimkd.errors import MethodError
from mimkd.features import FeatureSpec, FeatureTap, feature_points_of, probe_forward
from mimkd.models.cifar_resnet_bottleneck import CifarBottleneck
from mimkd.models.layers import BasicBlock, conv1x1, init_fan_out
from mimkd.models.mobilenetv2 import InvertedResidual
from mimkd.models.shufflenetv1 import ShuffleUnit
from mimkd.models.shufflenetv2 import DownBlock, SplitBlock
from mimkd.models.wrn import NetworkBlock

__all__ = [
    "AuxClassifier",
    "APFCHead",
    "AuxHeads",
    "HeadRule",
    "HEAD_RULES",
    "FALLBACK_RULE",
    "SUPPORTED_FAMILIES",
    "build_aux_heads",
    "family_of",
    "rule_of",
]


class AuxClassifier(nn.Module):
    """``body`` (re-implemented stages) -> ``final`` (BN-ReLU or identity) -> global avg-pool -> ``fc``."""

    def __init__(self, body: nn.Module, channels: int, num_classes: int, bn_relu: bool = False) -> None:
        super().__init__()
        self.body = body
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()) if bn_relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_fan_out(self)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map the head pools (its spatial size equals the backbone's last map)."""
        return self.final(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.feature_map(x)), 1))


class APFCHead(nn.Module):
    """The paper's "APFC" ablation head: ``AdaptiveAvgPool2d(4)`` then ``FC(16·C → num_classes)``."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * channels, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass
class AuxHeads:
    """The heads of one network, the module paths they read (``FeatureTap`` points) and the rule used."""

    heads: nn.ModuleDict  # {"C3": ..., "C2": ...}
    points: dict[str, str]  # {"C3": module path, "C2": module path}
    family: str
    kind: str


def _half(n: int) -> int:
    return max(1, math.ceil(n / 2))


def _res_stage(block: type[nn.Module], inp: int, planes: int, n: int, stride: int = 2) -> list[nn.Module]:
    """A torchvision-style stage of ``block(inplanes, planes, stride, downsample)`` blocks."""
    out = planes * block.expansion
    down = None
    if stride != 1 or inp != out:
        down = nn.Sequential(conv1x1(inp, out, stride), nn.BatchNorm2d(out))
    return [block(inp, planes, stride, down), *(block(out, planes) for _ in range(n - 1))]


def _conv_bn_relu(inp: int, out: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(inp, out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out), nn.ReLU()]


def _probe(model: nn.Module, points: list[str], sample: torch.Tensor) -> dict[str, FeatureSpec]:
    """Shapes of ``points`` for ``sample`` (one eval-mode forward; the hooks are removed afterwards)."""
    tap = FeatureTap(model, points)
    try:
        return {s.name: s for s in tap.specs(sample)}
    finally:
        tap.remove()


Parts = tuple[list[nn.Module], int, list[nn.Module], int]  # C3 layers, C3 width, C2 layers, C2 width
Specs = dict[str, FeatureSpec]
PlainStages = list[list[tuple[str, list[int]]]]  # resolution stages of (stage point, conv widths) blocks

# The stage builders read the backbone's structure by attribute (``Any``: the layout is the family's).


def _cifar_resnet(m: Any, c: Specs) -> Parts:
    n, w2, w3 = len(m.layer3), m.layer2[-1].bn2.num_features, m.layer3[-1].bn2.num_features
    c3 = _res_stage(BasicBlock, c["layer1"].channels, w2, _half(n)) + _res_stage(BasicBlock, w2, w3, _half(n))
    return c3, w3, _res_stage(BasicBlock, c["layer2"].channels, 2 * w3, n), 2 * w3


def _imagenet_resnet(m: Any, c: Specs) -> Parts:
    block, n3, n4 = type(m.layer4[0]), len(m.layer3), len(m.layer4)
    p3, p4, e = m.layer3[0].conv1.out_channels, m.layer4[0].conv1.out_channels, block.expansion
    c3 = _res_stage(block, c["layer2"].channels, p3, _half(n3)) + _res_stage(block, p3 * e, p4, min(n4, 2))
    return c3, p4 * e, _res_stage(block, c["layer3"].channels, 2 * p4, n4), 2 * p4 * e


def _cifar_bottleneck(m: Any, c: Specs) -> Parts:
    n3, n4, e = len(m.layer3), len(m.layer4), CifarBottleneck.expansion
    p3, p4 = m.layer3[0].conv1.out_channels, m.layer4[0].conv1.out_channels

    def stage(inp: int, planes: int, n: int) -> list[nn.Module]:
        return [CifarBottleneck(inp if i == 0 else planes * e, planes, 2 if i == 0 else 1) for i in range(n)]

    c3 = stage(c["layer2"].channels, p3, _half(n3)) + stage(p3 * e, p4, _half(n4))
    return c3, p4 * e, stage(c["layer3"].channels, 2 * p4, n4), 2 * p4 * e


def _wrn(m: Any, c: Specs) -> Parts:
    n, drop = len(m.block3.layer), m.block3.layer[0].drop_rate
    w2, w3 = m.block2.layer[0].conv1.out_channels, m.block3.layer[0].conv1.out_channels
    c3 = [NetworkBlock(n, c["block1"].channels, w2, 2, drop), NetworkBlock(max(1, n // 2), w2, w3, 2, drop)]
    return c3, w3, [NetworkBlock(n, c["block2"].channels, 2 * w3, 2, drop)], 2 * w3


def _mobilenetv2(m: Any, c: Specs) -> Parts:
    s5, s6 = m.blocks[5], m.blocks[6]
    t = s5[0].conv[0].out_channels // s5[0].conv[0].in_channels
    c5, c6, last = s5[-1].conv[-1].num_features, s6[-1].conv[-1].num_features, m.last_channel
    c3: list[nn.Module] = [InvertedResidual(c["blocks.4"].channels, c5, 2, t)]
    c3 += [InvertedResidual(c5, c5, 1, t) for _ in range(len(s5) - 1)]
    c3 += [InvertedResidual(c5, c6, 1, max(1, t // 2)), *_conv_bn_relu(c6, last, 1)]
    wide, wide_last = int(1.5 * c6), int(1.5 * last)
    c2 = [InvertedResidual(c["blocks.5"].channels, wide, 1, t), *_conv_bn_relu(wide, wide_last, 1)]
    return c3, last, c2, wide_last


def _shufflev1(m: Any, c: Specs) -> Parts:
    g, n2, n3 = m.layer2[0].conv3.groups, len(m.layer2), len(m.layer3)

    def stage(inp: int, out: int, n: int) -> list[nn.Module]:
        return [ShuffleUnit(inp, out - inp, 2, g, g), *(ShuffleUnit(out, out, 1, g, g) for _ in range(n - 1))]

    w1, w2, w3 = c["layer1"].channels, c["layer2"].channels, c["layer3"].channels
    return stage(w1, w2, _half(n2)) + stage(w2, w3, _half(n3)), w3, stage(w2, 2 * w3, n3), 2 * w3


def _shufflev2(m: Any, c: Specs) -> Parts:
    n2, n3, last = len(m.layer2) - 1, len(m.layer3) - 1, m.conv2.out_channels

    def stage(inp: int, out: int, n: int) -> list[nn.Module]:
        return [DownBlock(inp, out), *(SplitBlock(out) for _ in range(n))]

    w1, w2, w3 = c["layer1"].channels, c["layer2"].channels, c["layer3"].channels
    c3 = stage(w1, w2, _half(n2)) + stage(w2, w3, _half(n3)) + _conv_bn_relu(w3, last, 1)
    wide_last = int(1.5 * last)
    return c3, last, stage(w2, 2 * w3, n3) + _conv_bn_relu(2 * w3, wide_last, 1), wide_last


def _plain_stages(m: nn.Module, sample: torch.Tensor) -> tuple[PlainStages, bool]:
    """A plain conv stack's (stage point, conv widths) blocks grouped into resolution stages (consecutive
    blocks with one spatial size), and whether a max-pool runs after the last block; one probe forward.

    The blocks are the model's declared stage points; a block's convolutions are those that run after the
    previous stage point and before this one."""
    points = list(feature_points_of(m, sample).stages)
    modules = dict(m.named_modules())
    events: list[tuple[str, Any]] = []  # ("point", (name, spatial)), ("conv", width), ("maxpool", None)
    handles = [
        modules[p].register_forward_hook(lambda mod, i, o, p=p: events.append(("point", (p, o.shape[-2:]))))
        for p in points
    ]
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(lambda c, i, o: events.append(("conv", c.out_channels))))
        elif isinstance(mod, nn.MaxPool2d):
            handles.append(mod.register_forward_hook(lambda c, i, o: events.append(("maxpool", None))))
    probe_forward(m, sample, handles)
    stages: PlainStages = []
    widths: list[int] = []
    size = None
    for kind, value in events:
        if kind == "conv":
            widths.append(value)
        elif kind == "point":
            point, spatial = value
            if stages and size == spatial:
                stages[-1].append((point, widths))
            else:
                stages.append([(point, widths)])
            widths, size = [], spatial
    last = max(i for i, (kind, _) in enumerate(events) if kind == "point")
    return stages, any(kind == "maxpool" for kind, _ in events[last + 1 :])


def _plain(c: Specs, stages: PlainStages, pool_after: bool) -> Parts:
    def body(inp: int, todo: PlainStages, scale: int, half: bool) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for stage in todo:
            layers.append(nn.MaxPool2d(2))
            for _, widths in stage:
                for w in widths[: _half(len(widths))] if half else widths:
                    layers += _conv_bn_relu(inp, scale * w)
                    inp = scale * w
        return layers + ([nn.MaxPool2d(2)] if pool_after else [])  # the backbone pools before its GAP

    out = stages[-1][-1][1][-1]
    c3 = body(c[stages[-3][-1][0]].channels, stages[-2:], 1, True)
    return c3, out, body(c[stages[-2][-1][0]].channels, stages[-1:], 2, False), 2 * out


@dataclass(frozen=True)
class HeadRule:
    """How DCM places and builds the heads of one architecture family.

    ``points``: the fixed (C3, C2) branch points, or None to find them by probing (the plain stacks' last
    block of the third- and second-to-last resolution stage, any other model's last map of those
    resolutions). ``build``: the re-implemented stages for ``aux_head="stages"`` (None: none defined);
    ``plain``: the stages are rebuilt from a probe of the conv stack instead; ``extra``: more points whose
    shapes ``build`` reads; ``bn_relu``: the backbone ends with a BN-ReLU after its last stage.
    """

    points: tuple[str, str] | None = None
    build: Callable[[Any, Specs], Parts] | None = None
    plain: bool = False
    extra: tuple[str, ...] = ()
    bn_relu: bool = False

    @property
    def stages_defined(self) -> bool:
        return self.plain or self.build is not None


HEAD_RULES: dict[str, HeadRule] = {
    "cifar_resnet": HeadRule(("layer1", "layer2"), _cifar_resnet),
    "cifar_resnet_bottleneck": HeadRule(("layer2", "layer3"), _cifar_bottleneck),
    "wrn": HeadRule(("block1", "block2"), _wrn, bn_relu=True),
    "vgg": HeadRule(plain=True),
    "mobilenetv2": HeadRule(("blocks.4", "blocks.5"), _mobilenetv2),
    "shufflenetv1": HeadRule(("layer1", "layer2"), _shufflev1, extra=("layer3",)),
    "shufflenetv2": HeadRule(("layer1", "layer2"), _shufflev2, extra=("layer3",)),
    "imagenet_resnet": HeadRule(("layer2", "layer3"), _imagenet_resnet),
    "small": HeadRule(plain=True),
}
FALLBACK_RULE = HeadRule()  # a model of no known family: branch points by probing, aux_head="apfc" only
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(HEAD_RULES)


def family_of(model: nn.Module) -> str | None:
    """The architecture family ``model`` declares (its class's ``family``) when :data:`HEAD_RULES` has a rule
    for it, else None."""
    family = getattr(type(model), "family", None)
    return family if isinstance(family, str) and family in HEAD_RULES else None


def rule_of(model: nn.Module) -> HeadRule:
    """The head rule of ``model``'s declared family, or :data:`FALLBACK_RULE`."""
    family = family_of(model)
    return FALLBACK_RULE if family is None else HEAD_RULES[family]


def _last_per_resolution(model: nn.Module, points: list[str], sample: torch.Tensor) -> list[str]:
    last: dict[tuple[int, int] | None, str] = {}
    for name, spec in _probe(model, points, sample).items():
        if spec.is_map:
            last.pop(spec.spatial, None)
            last[spec.spatial] = name
    return list(last.values())


def build_aux_heads(
    model: nn.Module, num_classes: int, sample: torch.Tensor, kind: str = "stages"
) -> AuxHeads:
    """Build DCM's C3 and C2 heads for ``model`` (``kind``: ``"stages"`` or ``"apfc"``), see module doc."""
    family, rule = family_of(model), rule_of(model)
    if kind not in ("stages", "apfc"):
        raise MethodError(f"dcm: unknown aux_head {kind!r}; use 'stages' or 'apfc'")
    if kind == "stages" and not rule.stages_defined:
        raise MethodError(
            f"dcm: no auxiliary-classifier rule for {type(model).__name__}: method.aux_head=stages is "
            f"defined for the zoo families {', '.join(SUPPORTED_FAMILIES)}. Use method.aux_head=apfc "
            "(avg-pool to 4x4 + FC), which works for any model"
        )
    stages, pool_after = _plain_stages(model, sample) if rule.plain else ([], False)
    if rule.points is not None:
        pts = {"C3": rule.points[0], "C2": rule.points[1]}
    else:
        maps = [s[-1][0] for s in stages] if stages else None
        found = maps or _last_per_resolution(model, list(feature_points_of(model, sample).maps), sample)
        if len(found) < 3:
            raise MethodError(
                f"dcm: {type(model).__name__} has {len(found)} feature-map resolution(s) for this input; "
                "the auxiliary classifiers need at least 3 (two branch points before the last stage)"
            )
        pts = {"C3": found[-3], "C2": found[-2]}
    specs = _probe(model, [*pts.values(), *rule.extra], sample)
    if kind == "apfc":
        heads: dict[str, nn.Module] = {n: APFCHead(specs[p].channels, num_classes) for n, p in pts.items()}
    else:
        build = rule.build
        if stages:
            c3, w3, c2, w2 = _plain(specs, stages, pool_after)
        else:
            assert build is not None  # stages_defined
            c3, w3, c2, w2 = build(model, specs)
        heads = {
            "C3": AuxClassifier(nn.Sequential(*c3), w3, num_classes, rule.bn_relu),
            "C2": AuxClassifier(nn.Sequential(*c2), w2, num_classes, rule.bn_relu),
        }
    return AuxHeads(nn.ModuleDict(heads), pts, family or "other", kind)
