"""Feature capture is scoped to one forward: no hook records outside it, and tapped networks compile.

Real zoo networks, real distillers (AT and MIMKD read features through the base class's helper), real
``torch.compile`` on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mimkd.distillers import build_distiller
from mimkd.engine.step import TrainStep, compile_distiller
from mimkd.evaluation.accuracy import evaluate
from mimkd.features import FeatureTap
from mimkd.models import build_network


def _pair(method: str, **options):
    torch.manual_seed(0)
    s = build_network("resnet8", 10, 3)
    t = build_network("resnet14", 10, 3)
    x = torch.randn(8, 3, 32, 32)
    labels = torch.arange(64) % 10
    d = build_distiller(method, s, t, x[:4], num_classes=10, num_samples=64, train_labels=labels, **options)
    return d, x


def _taps(d) -> list[FeatureTap]:
    return [v for v in vars(d).values() if isinstance(v, FeatureTap)]


class _Counting:
    """Counts the values a tap stores (wraps its ``_store``)."""

    def __init__(self, taps: list[FeatureTap]) -> None:
        self.n = 0
        for tap in taps:
            original = tap._store

            def store(point, value, original=original):
                self.n += 1
                original(point, value)

            tap._store = store


@pytest.mark.parametrize("method", ["at", "mimkd"])
def test_hooks_record_nothing_outside_a_step(method):
    d, x = _pair(method, **({"num_negatives": 16} if method == "mimkd" else {}))
    taps = _taps(d)
    assert len(taps) == 2
    count = _Counting(taps)
    d.train()
    logits, terms = d(x, torch.arange(8) % 10, torch.arange(8))
    in_step = count.n
    assert in_step >= 4 and all(not t._values for t in taps)  # recorded in the step, emptied after it
    count.n = 0
    evaluate(d.student, [(x, torch.arange(8) % 10)])  # the trainer's evaluation of the student
    with torch.no_grad():
        d.teacher(x)
        d.student(x)
    assert count.n == 0 and all(not t._values for t in taps)
    s_tap = next(t for t in taps if t.model is d.student)
    with s_tap.capture():  # an explicit scope records again
        d.student(x)
    assert count.n > 0 and s_tap.features


def test_a_compiled_feature_method_matches_eager():
    """AT's student and teacher (both tapped) compiled with inductor: the same terms and weights as eager over
    three real optimisation steps (float tolerance: the compiled kernels fuse differently)."""
    torch._dynamo.reset()
    eager, x = _pair("at")
    compiled = copy.deepcopy(eager)
    compile_distiller(compiled)
    y = torch.arange(8) % 10
    results = []
    for d in (eager, compiled):
        torch.manual_seed(1)
        opt = torch.optim.SGD([p for _, p in d.trainable_named_parameters()], lr=0.05, momentum=0.9)
        step = TrainStep(d.train(), opt)
        results.append([step(x + 0.1 * k, y, torch.arange(8)).terms for k in range(3)])
    for a, b in zip(*results):
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, a[k], b[k])
    for (name, p), (_, q) in zip(eager.student.named_parameters(), compiled.student.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
    assert _taps(compiled)[0]._values == {}  # the compiled step replays the hooks' stores, then empties them
    assert all(m._compiled_call_impl is not None for m in (compiled.student, compiled.teacher))
