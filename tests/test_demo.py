"""The demo harness on real data at smoke-test scale, and its statistics."""

from __future__ import annotations

import json
import math

import pytest

from mimkd.demo import format_table, summarise

from helpers import needs_fmnist


def _s(top1_last, top1_best, diverged=False, status="finished"):
    return {
        "status": status,
        "diverged": diverged,
        "last": {"top1": top1_last},
        "best": {"top1": top1_best},
        "wall_time_s": 10.0,
    }


def test_summarise_uses_sample_std_and_excludes_runs_that_did_not_finish_well():
    near = {**_s(10.0, 12.0), "near_chance": True}
    old_near = _s(11.0, 12.0, diverged=True)  # written before near_chance: a finished run near chance
    rows = summarise(
        {
            "vanilla": [_s(87.0, 87.5), _s(87.2, 87.6), _s(87.4, 87.7)],
            "kd": [_s(89.0, 89.1), near, old_near, _s(89.2, 89.3), {"status": "failed"}],
            "mimkd": [_s(90.0, 90.0), {"status": "diverged", "error": "non-finite loss"}],
        }
    )
    van, kd, mimkd = rows
    assert van["last_mean"] == pytest.approx(87.2) and van["last_std"] == pytest.approx(0.2)
    assert kd["runs"] == 2 and kd["excluded"] == {"near_chance": 2, "failed": 1}
    assert mimkd["runs"] == 1 and mimkd["excluded"] == {"diverged": 1}
    assert kd["last_mean"] == pytest.approx(89.1) and kd["gain_vs_vanilla"] == pytest.approx(1.9)
    table = format_table(rows, "header")
    assert "| kd | 89.10 ± 0.14 |" in table and "2 near chance, 1 failed: excluded" in table
    assert "1 diverged: excluded" in table and table.count("diverged") == 1
    empty = summarise({"mimkd": []})[0]
    assert math.isnan(empty["last_mean"])


@needs_fmnist
def test_demo_smoke_real_data(tmp_path):
    from mimkd.demo import run_demo

    res = run_demo(
        out_dir=str(tmp_path / "demo"),
        cache_dir=str(tmp_path / "cache"),
        seeds=1,
        epochs=1,
        workers=2,
        progress=False,
        teacher_epochs=1,
        teacher_fraction=0.1,
        train_fraction=0.02,
    )
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"vanilla", "kd", "mimkd", "mimkd+kd"}
    for r in rows.values():
        assert r["runs"] == 1 and r["last_mean"] > 15.0  # above the 10 % chance level after one epoch
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 5000
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]
    mimkd_metrics = (tmp_path / "demo" / "runs" / "mimkd_s0" / "metrics.jsonl").read_text()
    assert "metric.mi_feature" in mimkd_metrics and "loss.mi_global" in mimkd_metrics
    # a second call reuses the cached teacher and the finished runs
    again = run_demo(
        out_dir=str(tmp_path / "demo"),
        cache_dir=str(tmp_path / "cache"),
        seeds=1,
        epochs=1,
        workers=2,
        progress=False,
        teacher_epochs=1,
        teacher_fraction=0.1,
        train_fraction=0.02,
    )
    assert again["wall_time_s"] < res["wall_time_s"]
    assert [r["last"] for r in again["rows"]] == [r["last"] for r in res["rows"]]
