"""MIMKD through the real CLI on real data: terms logged separately, MI estimates rise, exact resume."""

from __future__ import annotations

import json

import torch

from helpers import SMALL_RUN, kill_mid_run, needs_fmnist, run_cli

pytestmark = needs_fmnist

MIMKD_ARGS = [
    "--method",
    "mimkd",
    "--student",
    "conv4mp_w32",
    "--set",
    "method.critic_width=16",
    "--set",
    "method.num_negatives=256",
]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mimkd_run_logs_every_term_and_its_mi_estimates_rise(tiny_teacher, tmp_path):
    run_cli(
        "distill",
        "--teacher",
        str(tiny_teacher),
        *MIMKD_ARGS,
        *SMALL_RUN,
        "--epochs",
        "3",
        "--out",
        str(tmp_path),
        "--name",
        "m",
    )
    recs = _records(tmp_path / "m")
    for key in (
        "loss.ce",
        "loss.mi_global",
        "loss.mi_local",
        "loss.mi_feature",
        "metric.mi_global",
        "metric.mi_local",
        "metric.mi_feature",
    ):
        assert all(key in r for r in recs), key
    first, last = recs[0], recs[-1]
    # the critics learn: every MI lower bound is higher in the last epoch than in the first
    for key in ("metric.mi_global", "metric.mi_local", "metric.mi_feature"):
        assert last[key] > first[key], (key, first[key], last[key])
    # JSD bounds are never positive; infoNCE's is capped by log(K+1)
    assert last["metric.mi_local"] <= 0 and last["metric.mi_feature"] <= 0
    assert last["metric.mi_global"] <= torch.log(torch.tensor(257.0)).item()
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["method_params"] > 0 and s["last"]["top1"] > 30.0


def test_mimkd_sigkill_resume_is_bit_identical_with_critics_and_banks(tiny_teacher, tmp_path):
    args = [
        "distill",
        "--teacher",
        str(tiny_teacher),
        *MIMKD_ARGS,
        *SMALL_RUN,
        "--seed",
        "1",
        "--epochs",
        "2",
        "--set",
        "train.checkpoint_every_steps=5",
    ]
    run_cli(*args, "--out", str(tmp_path), "--name", "full")
    train_seconds = json.loads((tmp_path / "full" / "summary.json").read_text())["wall_time_s"]
    reached = kill_mid_run(args, tmp_path, "killed", seed=7, max_delay=0.8 * train_seconds)
    assert reached < 2000, "the run finished before it was killed"
    run_cli(*args, "--out", str(tmp_path), "--name", "killed", "--resume")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert any(k.startswith("contrast.bank_student") for k in a["method_state"])
    for part in ("model", "method_state"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
