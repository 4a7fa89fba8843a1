"""FeatureTap on models the zoo does not know: explicit points, discovery, in-place detection, pairing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mimkd.errors import ModelError
from mimkd.features import FeatureSpec, FeatureTap, discover_points, pair_by_size


class PlainCNN(nn.Module):
    """A model with no declared feature points and no named stages."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(x))


def test_explicit_points_capture_exact_values():
    torch.manual_seed(0)
    m = PlainCNN().eval()
    tap = FeatureTap(m, ["body.4", "head:input"])
    x = torch.randn(2, 3, 16, 16)
    out, feats = tap.run(x)
    expected_map = m.body[:5](x)
    torch.testing.assert_close(feats["body.4"], expected_map)
    torch.testing.assert_close(feats["head:input"], m.body(x))
    torch.testing.assert_close(out, m.head(feats["head:input"]))


def test_discovery_finds_last_module_per_resolution_and_embedding():
    m = PlainCNN()
    fp = discover_points(m, torch.randn(2, 3, 16, 16))
    # 16x16: conv, bn, relu, conv, relu -> last is body.4; 8x8: maxpool, conv, relu -> body.7; 4x4: body.9
    assert fp.stages == ("body.4", "body.7", "body.9")
    assert fp.embedding == "head:input"
    assert not fp.has_stem
    specs = FeatureTap(m, list(fp.stages)).specs(torch.randn(2, 3, 16, 16))
    assert [s.shape for s in specs] == [(8, 16, 16), (16, 8, 8), (32, 4, 4)]


def test_discovery_prefers_containers_over_their_last_child():
    class Staged(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.stage2 = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.stage2(self.stage1(x)).mean((2, 3)))

    fp = discover_points(Staged(), torch.randn(1, 3, 8, 8))
    assert fp.stages == ("stage1", "stage2")
    assert fp.embedding == "fc:input"


def test_unknown_point_names_the_module_and_suggests():
    with pytest.raises(ModelError, match=r"no module 'body\.44'.*body\.4"):
        FeatureTap(PlainCNN(), ["body.44"])


def test_in_place_modification_after_hook_point_is_detected():
    m = PlainCNN(inplace=True)
    tap = FeatureTap(m, ["body.1"])  # BatchNorm output, then ReLU(inplace=True) rewrites it
    with pytest.raises(ModelError, match="'body.1' was modified in place"):
        tap.run(torch.randn(2, 3, 8, 8))


def test_hooks_removed():
    m = PlainCNN()
    tap = FeatureTap(m, ["body.4"])
    tap.remove()
    tap.clear()
    m(torch.randn(1, 3, 8, 8))
    with pytest.raises(ModelError, match="did not run"):
        _ = tap.features


def _s(name, c, h):
    return FeatureSpec(name, (c, h, h))


def test_pair_by_size_takes_deepest_map_per_size_in_order():
    teacher = [_s("t1", 16, 32), _s("t2", 32, 16), _s("t3", 64, 8), _s("t4", 64, 8), _s("t5", 128, 4)]
    student = [_s("s1", 8, 16), _s("s2", 8, 16), _s("s3", 16, 8), _s("s4", 32, 2)]
    pairs = pair_by_size(teacher, student)
    assert [(t.name, s.name) for t, s in pairs] == [("t2", "s2"), ("t4", "s3")]
    assert pair_by_size([_s("a", 1, 4)], [_s("b", 1, 8)]) == []
    # vectors are never paired
    assert pair_by_size([FeatureSpec("v", (64,))], [FeatureSpec("w", (64,))]) == []
