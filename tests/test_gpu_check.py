"""The prepared GPU check (benchmarks/gpu_check.sh) in its CPU dry run: every step runs and is summarised.

No GPU numbers come from this test: it keeps the script runnable for the day a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import FMNIST

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "check"
    env_py = {"PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    cmd = [
        "bash",
        "benchmarks/gpu_check.sh",
        "--dry-run",
        "--out",
        str(out),
        "--data-root",
        str(FMNIST.parent),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env_py)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    failed = {s["step"]: (out / f"{s['step']}.log").read_text()[-1500:] for s in steps if s["rc"]}
    assert res.returncode == 0 and not failed, (res.stderr[-2000:], failed)
    names = [s["step"] for s in steps]
    assert names == [
        "env",
        "tests",
        "bench_bf16",
        "banks",
        "teacher",
        "student_kd",
        "student_mimkd",
        "torchrun",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["tests"].get("failed", 0) == 0
    assert summary["tests"].get("skipped", 0) + summary["tests"].get("passed", 0) >= 8  # the CUDA tests
    rows = {r["row"] for r in summary["bench"]["bench_fp32"]["rows"]}
    assert {"kd", "mimkd:critic_locations=16"} <= rows
    assert {r["method"] for r in summary["banks"]} == {"crd", "mimkd"}
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {"runs/teacher", "runs/kd", "runs/mimkd", "torchrun/crd"}
    assert all(r["status"] == "finished" and r["test_top1"] is not None for r in runs.values())
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check (DRY RUN on the CPU")
