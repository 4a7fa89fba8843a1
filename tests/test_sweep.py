"""mimkd sweep / mimkd report on a tiny real study (Fashion-MNIST), and the study file's error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mimkd.errors import ConfigError, MimkdError
from mimkd.experiments.study import load_study
from mimkd.experiments.sweep import parse_shard, sweep

from helpers import needs_fmnist, run_cli

TINY_BASE = {
    "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.1},
    "optim": {"recipe": "fashion_mnist", "epochs": 2, "batch_size": 32},
    "train": {"progress": False, "eval_teacher": False, "tensorboard": False, "measure_latency": False},
}


def write_study(tmp: Path, **changes) -> Path:
    study = {
        "study": "tiny",
        "description": "a tiny real study",
        "seeds": 2,
        "base": TINY_BASE,
        "teachers": {"t": {"arch": "conv4mp_w32", "train": {"optim": {"epochs": 1}}}},
        "pairs": [{"teacher": "t", "student": "conv4mp"}],
        "methods": {"vanilla": {}, "kd": {}},
        "published": {"t-conv4mp": {"teacher": 80.0, "vanilla": 70.0, "kd": [71.0, 0.5]}},
        "published_source": "made up for the test",
    }
    study.update(changes)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_plan_expands_pairs_rows_grid_seeds(tmp_path):
    path = write_study(
        tmp_path,
        pairs=[
            {"teacher": "t", "student": "conv4mp"},
            {"teacher": "t", "student": "conv4mp", "label": "again"},
        ],
        methods={
            "vanilla": {},
            "kd": {},
            "kd_t2": {"name": "kd", "temperature": 2.0, "set": ["optim.lr=0.01"]},
        },
        grid={"method.kd_weight": [0.5, 0.9]},
        grid_rows=["kd_t2"],
        published={},
    )
    runs = load_study(path).plan(seeds=3, out=tmp_path / "out")
    teachers = [r for r in runs if r.kind == "teacher"]
    students = [r for r in runs if r.kind == "student"]
    assert len(teachers) == 1 and runs[0].kind == "teacher"  # teachers come first
    # vanilla once per student (shared by both pairs), kd per pair, kd_t2 per pair x 2 grid points; x 3 seeds
    assert len(students) == (1 + 2 + 4) * 3
    vanilla = [r for r in students if r.row == "vanilla"]
    assert all(r.pairs == ["t-conv4mp", "again"] and "teacher" not in r.config for r in vanilla)
    kd_t2 = [r for r in students if r.row == "kd_t2"]
    assert {r.config["method"]["kd_weight"] for r in kd_t2} == {0.5, 0.9}
    assert all(r.config["optim"]["lr"] == 0.01 and r.config["method"]["temperature"] == 2.0 for r in kd_t2)
    kd = next(r for r in students if r.row == "kd")
    assert kd.config["teacher"]["checkpoint"] == str(tmp_path / "out" / teachers[0].key / "last.pt")
    assert kd.needs == teachers[0].key and kd.epochs == 2
    assert len({r.key for r in runs}) == len(runs)


def test_shards_partition_the_student_runs(tmp_path, capsys):
    path = write_study(tmp_path, seeds=3)
    keys = []
    for i in (1, 2, 3):
        sweep(path, out=tmp_path / "out", shard=f"{i}/3", dry_run=True)
        lines = capsys.readouterr().out.splitlines()[1:]
        keys.append({ln.split()[0] for ln in lines if not ln.strip().startswith("teachers/")})
    everything = {r.key for r in load_study(path).plan(out=tmp_path / "out") if r.kind == "student"}
    assert set.union(*keys) == everything and sum(len(k) for k in keys) == len(everything)
    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 3}, r"seed: unknown key\. Did you mean: seeds"),
        ({"methods": {"kdd": {}}}, r"unknown method 'kdd'.*kd"),
        ({"methods": {"kd": {"temprature": 2}}}, r"method\.temprature: unknown option of 'kd'"),
        ({"pairs": [{"teacher": "nobody", "student": "conv4mp"}]}, r"teacher 'nobody' is not under teachers"),
        ({"pairs": [{"teacher": "t", "student": "resnet9"}]}, r"resnet9"),
        ({"published": {"t-conv4": {"kd": 70}}}, r"'t-conv4' is not a pair label.*t-conv4mp"),
        ({"published": {"t-conv4mp": {"crd": 70}}}, r"'crd' is not a row of methods"),
        ({"teachers": {"t": {"arch": "conv4mp_w32"}}}, r"give one of checkpoint"),
        ({"methods": {"vanilla": {}, "kd": {"set": ["optim.lrr=1"]}}}, r"optim\.lrr: unknown key"),
    ],
)
def test_study_file_errors_name_the_problem(tmp_path, change, message):
    with pytest.raises(MimkdError, match=message):
        load_study(write_study(tmp_path, **change)).plan(out=tmp_path)


def test_missing_teacher_checkpoint_is_refused_before_any_run(tmp_path):
    path = write_study(tmp_path, teachers={"t": {"arch": "conv4mp_w32", "checkpoint": "t.pt"}})
    proc = run_cli(
        "sweep", str(path), "--out", str(tmp_path / "out"), "--teachers", str(tmp_path), check=False
    )
    assert proc.returncode == 2 and "t.pt" in proc.stderr and "--teachers DIR" in proc.stderr
    assert not (tmp_path / "out" / "tiny").exists()
    dry = run_cli(
        "sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run", "--teachers", str(tmp_path)
    )
    assert "missing teacher checkpoint" in dry.stdout


@needs_fmnist
def test_sweep_runs_skips_resumes_and_reports(tmp_path):
    out = tmp_path / "out"
    path = write_study(tmp_path, grid={"method.kd_weight": [0.5, 0.9]}, grid_rows=["kd"])
    run_cli("sweep", str(path), "--out", str(out), "--jobs", "2", "--threads", "1")
    study_dir = out / "tiny"
    plan = json.loads((study_dir / "sweep.json").read_text())["runs"]
    assert len(plan) == 1 + 2 * (1 + 2)  # a teacher; vanilla and kd at two grid points, two seeds each
    for r in plan:
        s = json.loads((out / r["key"] / "summary.json").read_text())
        assert s["status"] == "finished" and s["epochs"] == (1 if r["kind"] == "teacher" else 2)

    # a second sweep trains nothing; a run whose summary is gone (interrupted at the end) is resumed
    stamps = {r["key"]: (out / r["key"] / "last.pt").stat().st_mtime_ns for r in plan}
    victim = out / plan[-1]["key"]
    (victim / "summary.json").unlink()
    dry = run_cli("sweep", str(path), "--out", str(out), "--dry-run").stdout
    assert dry.count("finished") == len(plan) - 1 and "interrupted: resumes" in dry
    run_cli("sweep", str(path), "--out", str(out), "--jobs", "1")
    assert json.loads((victim / "summary.json").read_text())["status"] == "finished"
    assert all((out / k / "last.pt").stat().st_mtime_ns == t for k, t in stamps.items() if out / k != victim)

    proc = run_cli("report", str(study_dir), "--compare-published")
    text = (study_dir / "report.md").read_text()
    assert proc.stdout.startswith(text[:200])
    table = [ln for ln in text.splitlines() if ln.startswith("| vanilla")][0].split(" | ")
    vals = [
        json.loads((out / r["key"] / "summary.json").read_text())["last"]["top1"]
        for r in plan
        if r["row"] == "vanilla"
    ]
    mean = sum(vals) / 2
    std = abs(vals[0] - vals[1]) / 2**0.5
    assert table[1] == f"{mean:.2f} ± {std:.2f}"
    assert table[4] == "70.00" and table[5] == f"{mean - 70.0:+.2f}"
    kd_line = [ln for ln in text.splitlines() if ln.startswith("| kd [kd_weight=0.9]")][0]
    assert "71.00 ± 0.50" in kd_line and "2/2" in kd_line
    report = json.loads((study_dir / "report.json").read_text())
    assert {e["row"] for e in report["entries"]} == {"vanilla", "kd"}
    assert (study_dir / "curves_t-conv4mp.png").stat().st_size > 10_000


def test_report_refuses_a_directory_that_is_not_a_study(tmp_path):
    proc = run_cli("report", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not a study directory" in proc.stderr


def test_a_teacher_named_from_the_catalogue_is_planned_by_name_and_not_missing(tmp_path):
    """A study may name a published teacher (docs/teachers.md): each run fetches it, nothing is joined to
    --teachers DIR and the sweep does not refuse it as a missing file."""
    path = write_study(tmp_path, teachers={"t": {"arch": "resnet56", "checkpoint": "repdistiller:resnet56"}})
    runs = load_study(path).plan(out=tmp_path, teachers_dir=tmp_path / "teachers")
    assert {r.config["teacher"]["checkpoint"] for r in runs if r.config.get("teacher")} == {
        "repdistiller:resnet56"
    }
    dry = run_cli(
        "sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run", "--teachers", str(tmp_path)
    )
    assert "missing teacher checkpoint" not in dry.stdout
