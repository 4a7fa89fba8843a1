"""StepContext: a method learns where training is (stage, epoch, step, progress) without the trainer knowing.

A test-only method with an init stage and a linear warm-up of its distillation term records the context of
every call, through the real trainer on real Fashion-MNIST data (a real tiny teacher), and through a crash
and a resume; a method written before the context existed still runs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimkd.config import build_config
from mimkd.distillers import InitStage, StepContext, register_distiller
from mimkd.distillers.base import Distiller, MethodOptions
from mimkd.distillers.registry import _METHODS
from mimkd.engine.setup import run

from helpers import needs_fmnist

SEEN: list[tuple[str, int, int, int, int, float]] = []  # (stage, epoch, step, steps/epoch, epochs, factor)
CRASH_AT: dict[str, int] = {}  # {"main_call": n}: raise at the n-th main-stage call (a crash)
STEPS = 4  # train.max_steps_per_epoch


class WarmupOptions(MethodOptions):
    warmup_epochs: int = 2
    init_epochs: int = 1


class Crash(RuntimeError):
    pass


def _register() -> None:
    if "_warmup_probe" in _METHODS:
        return

    @register_distiller("_warmup_probe")
    class WarmupProbe(Distiller):
        Options = WarmupOptions

        def __init__(self, student, teacher, options, context):
            super().__init__(student, teacher, options, context)
            self.head = nn.Linear(context.num_classes, context.num_classes)
            self.main_calls = 0

        def _seen(self, ctx: StepContext, factor: float) -> None:
            SEEN.append((ctx.stage, ctx.epoch, ctx.step, ctx.steps_per_epoch, ctx.epochs, factor))

        def stage_loss(self, images, index, ctx):
            self._seen(ctx, 1.0)
            with torch.no_grad():
                t = self.teacher(images)
            return {"head": ((self.head(t) - t) ** 2).mean()}

        def init_stages(self):
            return [InitStage("head_init", self.options.init_epochs, [self.head], self.stage_loss)]

        def compute(self, images, labels, index, ctx):
            factor = ctx.warmup(self.options.warmup_epochs)  # the method's own schedule
            if ctx.stage == "main":
                self.main_calls += 1
                if CRASH_AT.get("main_call") == self.main_calls:
                    raise Crash("simulated crash in the main stage")
            self._seen(ctx, factor)
            logits = self.student(images)
            with torch.no_grad():
                t = self.teacher(images)
            kd = F.kl_div(F.log_softmax(logits, 1), F.softmax(t, 1), reduction="batchmean")
            return logits, {"ce": self.cross_entropy(logits, labels), "kd": factor * kd}


def _cfg(tiny_teacher, tmp_path, name: str, epochs: int = 3):
    return build_config(
        {
            "seed": 5,
            "threads": 1,
            "out_dir": str(tmp_path),
            "name": name,
            "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.05},
            "student": {"arch": "conv4mp_w32"},
            "teacher": {"arch": "cnn_teacher", "checkpoint": str(tiny_teacher)},
            "method": {"name": "_warmup_probe"},
            "optim": {"epochs": epochs, "batch_size": 64, "lr": 0.05},
            "train": {
                "progress": False,
                "eval_teacher": False,
                "checkpoint_every_steps": 2,
                "max_steps_per_epoch": STEPS,
            },
        }
    )


def _expected(epochs: int) -> list[tuple]:
    stage = [("head_init", 0, s, STEPS, 1, 1.0) for s in range(STEPS)]
    main = [("main", e, s, STEPS, epochs, min((e + 1) / 2, 1.0)) for e in range(epochs) for s in range(STEPS)]
    return stage + main


def test_step_context_arithmetic():
    ctx = StepContext("main", epoch=2, step=5, steps_per_epoch=10, epochs=4)
    assert ctx.global_step == 25 and ctx.total_steps == 40 and ctx.progress == 25 / 40
    assert ctx.epoch_position == 2.5
    assert ctx.warmup(4) == 0.75 and ctx.warmup(2) == 1.0 and ctx.warmup(0) == 1.0
    first = StepContext("main", 0, 0, 10, 4)
    assert first.progress == 0.0 and first.warmup(20) == 1 / 20
    alone = StepContext.standalone()
    assert alone.stage == "standalone" and alone.progress == 1.0 and alone.warmup(20) == 1.0
    with pytest.raises(ValueError, match="steps_per_epoch"):
        StepContext("main", 0, 0, 0, 1)


@needs_fmnist
def test_every_call_gets_its_position_through_init_stage_and_main_stage(tiny_teacher, tmp_path):
    _register()
    SEEN.clear()
    CRASH_AT.clear()
    summary = run(_cfg(tiny_teacher, tmp_path, "ctx"))
    assert summary["status"] == "finished"
    assert SEEN[0][0] == "standalone"  # the pre-run probe of the method on a copy: outside the trainer
    assert SEEN[1:] == _expected(3)
    records = [json.loads(x) for x in (tmp_path / "ctx" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["loss.kd"] for r in records if "test.top1" in r]
    ce = [r["loss.ce"] for r in records if "test.top1" in r]
    assert len(kd) == 3 and kd[0] < kd[1] and all(k > 0 for k in kd) and all(c > 0 for c in ce)


@needs_fmnist
def test_resume_continues_the_positions_and_ends_bit_identical(tiny_teacher, tmp_path):
    _register()
    CRASH_AT.clear()
    SEEN.clear()
    ref = run(_cfg(tiny_teacher, tmp_path, "ref"))
    assert ref["status"] == "finished"
    SEEN.clear()
    CRASH_AT["main_call"] = 7  # epoch 2, step 3 (after the checkpoint at step 2 of that epoch)
    with pytest.raises(Crash):
        run(_cfg(tiny_teacher, tmp_path, "cut"))
    ck = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    assert (ck["epoch"], ck["step"]) == (1, 2)
    CRASH_AT.clear()
    SEEN.clear()
    resumed = run(_cfg(tiny_teacher, tmp_path, "cut"), resume=True)
    assert resumed["status"] == "finished"
    expected = _expected(3)
    resume_at = expected.index(("main", 1, 2, STEPS, 3, 1.0))
    assert SEEN[0][0] == "standalone" and SEEN[1:] == expected[resume_at:]  # no stage again, no step twice
    a = torch.load(tmp_path / "ref" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    for key in ("model", "method_state"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after the resume"


def test_a_method_written_before_the_context_still_runs():
    class Legacy(Distiller):
        def compute(self, images, labels, index=None):  # no ctx parameter
            logits = self.student(images)
            return logits, {"ce": self.cross_entropy(logits, labels)}

    from mimkd.distillers.base import DistillContext

    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    d = Legacy(student, None, MethodOptions(), DistillContext(torch.zeros(2, 1, 2, 2), 3))
    ctx = StepContext("main", 0, 0, 1, 1)
    logits, terms = d(torch.randn(2, 1, 2, 2), torch.tensor([0, 2]), None, ctx)
    assert logits.shape == (2, 3) and set(terms) == {"ce"}


def test_capabilities_are_declared_in_one_place():
    from mimkd.distillers import Capabilities, get_method

    kdep = get_method("kdep")
    assert kdep.capabilities == Capabilities(uses_labels=False, evaluated=False)
    assert (kdep.uses_labels, kdep.evaluated, kdep.requires_teacher) == (False, False, True)
    assert get_method("dml").requires_teacher is False and get_method("kd").evaluated is True
    with pytest.raises(TypeError, match="capabilities"):

        class Bad(Distiller):  # noqa: F841 - defining it is the test
            uses_labels = False
