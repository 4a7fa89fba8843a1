"""The trainer's init stages (docs/architecture.md): modes on every step, the stage optimiser, resume
inside a stage.

A probe method defined here declares one init stage on a small head of its own and records, at every stage
step and every main step, the mode of the student, the teacher and the stage module. It runs through the real
trainer on real Fashion-MNIST data with a real (tiny) teacher checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mimkd.config import build_config
from mimkd.distillers import InitStage, register_distiller
from mimkd.distillers.base import Distiller, MethodOptions
from mimkd.distillers.registry import _METHODS
from mimkd.engine.setup import run

from helpers import needs_fmnist

pytestmark = needs_fmnist

LOG: list[tuple[str, bool, bool, bool]] = []  # (phase, student.training, teacher.training, head.training)
CRASH_AT: dict[str, int] = {}  # {"stage_step": n}: raise inside the stage at its n-th step (a crash)


class ProbeOptions(MethodOptions):
    init_epochs: int = 1


class Crash(RuntimeError):
    pass


def _register() -> None:
    if "_probe_stages" in _METHODS:
        return

    @register_distiller("_probe_stages")
    class ProbeStages(Distiller):
        Options = ProbeOptions

        def __init__(self, student, teacher, options, context):
            super().__init__(student, teacher, options, context)
            classes = context.num_classes
            self.head = nn.Sequential(nn.Linear(classes, 16), nn.BatchNorm1d(16), nn.Linear(16, classes))
            self.stage_steps = 0

        def _modes(self, phase: str) -> None:
            LOG.append((phase, self.student.training, self.teacher.training, self.head.training))

        def stage_loss(self, images, index):
            self._modes("stage")
            self.stage_steps += 1
            if CRASH_AT.get("stage_step") == self.stage_steps:
                raise Crash("simulated crash inside the init stage")
            with torch.no_grad():
                t = self.teacher(images)
                s = self.student(images)
            return {"head": ((self.head(s) - t) ** 2).mean()}

        def init_stages(self):
            return [InitStage("head", self.options.init_epochs, [self.head], self.stage_loss)]

        def compute(self, images, labels, index=None):
            self._modes("main")
            logits = self.student(images)
            return logits, {"ce": self.cross_entropy(logits, labels)}


def _cfg(tiny_teacher, tmp_path, name: str, epochs: int = 2, init_epochs: int = 2):
    return build_config(
        {
            "seed": 3,
            "threads": 1,
            "out_dir": str(tmp_path),
            "name": name,
            "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.05},
            "student": {"arch": "conv4mp_w32"},
            "teacher": {"arch": "cnn_teacher", "checkpoint": str(tiny_teacher)},
            "method": {"name": "_probe_stages", "init_epochs": init_epochs},
            "optim": {"epochs": epochs, "batch_size": 64, "lr": 0.05},
            "train": {"progress": False, "eval_teacher": False, "checkpoint_every_steps": 3},
        }
    )


def test_modes_on_every_step_including_after_eval_and_after_init_stage(tiny_teacher, tmp_path):
    _register()
    LOG.clear()
    CRASH_AT.clear()
    summary = run(_cfg(tiny_teacher, tmp_path, "modes"))
    assert summary["status"] == "finished"
    assert LOG[0][0] == "main" and LOG[0][1]  # the pre-run probe of the method (on a copy, train mode)
    del LOG[0]
    stage = [e for e in LOG if e[0] == "stage"]
    main = [e for e in LOG if e[0] == "main"]
    steps = 1200 // 64  # 2 % of Fashion-MNIST, drop_last
    assert len(stage) == 2 * steps and len(main) == 2 * steps
    # stage: distiller in eval mode, the stage module in train mode, the teacher in eval mode
    assert all(not s and not t and h for _, s, t, h in stage)
    # main, including every step after the epoch-1 evaluation and after the stage: student train, teacher eval
    assert all(s and not t for _, s, t, _h in main)
    assert LOG.index(main[0]) == len(stage)  # the stage ran entirely before the main training
    records = [json.loads(line) for line in (tmp_path / "modes" / "metrics.jsonl").read_text().splitlines()]
    stage_recs = [r for r in records if "stage_index" in r]
    assert [r["stage_epoch"] for r in stage_recs] == [0, 1]
    assert all(r["init.loss.head"] > 0 for r in stage_recs)
    assert stage_recs[1]["init.loss.head"] < stage_recs[0]["init.loss.head"]  # the stage optimiser works


def test_resume_inside_init_stage_is_bit_identical(tiny_teacher, tmp_path):
    _register()
    CRASH_AT.clear()
    ref = run(_cfg(tiny_teacher, tmp_path, "ref", epochs=1))
    assert ref["status"] == "finished"
    CRASH_AT["stage_step"] = 25  # epoch 2 of the stage (18 steps per epoch), after a mid-epoch checkpoint
    with pytest.raises(Crash):
        run(_cfg(tiny_teacher, tmp_path, "cut", epochs=1))
    ck = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["init"]["done"] == 0 and ck["init"]["epoch"] == 1 and ck["init"]["step"] == 6
    assert ck["init"]["optimizer"] is not None
    CRASH_AT.clear()
    resumed = run(_cfg(tiny_teacher, tmp_path, "cut", epochs=1), resume=True)
    assert resumed["status"] == "finished"
    a = torch.load(tmp_path / "ref" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    for key in ("model", "method_state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resuming inside the stage"
    assert b["init"]["done"] == 1
    recs = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage_epoch"] for r in recs if "stage_index" in r] == [0, 1]  # no duplicated stage epoch


@pytest.mark.parametrize(
    ("method", "sets", "stage_term", "main_term"),
    [
        ("ft", ["method.init_epochs=1"], "init.loss.paraphraser", "loss.ft"),
        ("fitnets", ["method.two_stage=true", "method.init_epochs=1"], "init.loss.hint", "loss.ce"),
        ("crd", [], None, "loss.crd"),
    ],
)
def test_cli_distill_with_baselines_end_to_end(tiny_teacher, tmp_path, method, sets, stage_term, main_term):
    """A real `mimkd distill` run per kind of baseline: an init stage then the main stage, or the bank."""
    from helpers import SMALL_RUN, run_cli

    extra = [a for s in sets for a in ("--set", s)]
    run_cli(
        "distill", "--teacher", str(tiny_teacher), "--student", "conv4mp_w32", "--method", method,
        *SMALL_RUN, "--epochs", "1", *extra, "--out", str(tmp_path), "--name", "r",
    )  # fmt: skip
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["method"] == method
    assert summary["last"]["top1"] > 20.0
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    stage = [r for r in recs if "stage_index" in r]
    main = [r for r in recs if "test.top1" in r]
    if stage_term:
        assert len(stage) == 1 and stage[0][stage_term] > 0
    else:
        assert not stage
    assert len(main) == 1 and main[0][main_term] > 0
