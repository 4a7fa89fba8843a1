"""Small reliability fixes, each through the real CLI: config sections that are not mappings, run names that
leave --out, a batch of one for MIMKD, one-line warnings, corrupt last.pt on --resume, near-chance runs that
are not divergences."""

from __future__ import annotations

import json

import pytest

from helpers import SMALL_RUN, needs_fmnist, run_cli

RUN = ["--epochs", "1", "--set", "train.max_steps_per_epoch=2"]


def _the_error_line(p) -> str:
    """The run failed with exit 2 and wrote exactly one line on stderr, ``mimkd: error: ...``."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("mimkd: error: "), p.stderr[-2000:]
    assert "spec §" not in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------------
# 1. every config section is a mapping of keys


SECTION_CASES = [
    ("optim: 5", "optim", "got 5"),
    ("train: hello", "train", "got 'hello'"),
    ("method: [1, 2]", "method", "got [1, 2]"),
    ("data: 3", "data", "got 3"),
    ("student: resnet8x4", "student", "got 'resnet8x4'"),
    ("teacher: 7", "teacher", "got 7"),
]


@pytest.mark.parametrize(("yaml_line", "section", "got"), SECTION_CASES, ids=[c[1] for c in SECTION_CASES])
def test_config_section_that_is_not_a_mapping_is_refused(tmp_path, yaml_line, section, got):
    config = tmp_path / "run.yaml"
    student = "" if section == "student" else "student: {arch: conv4mp_w32}\n"
    config.write_text(f"{student}{yaml_line}\n")
    # SMALL_RUN's flags give keys to data, optim and train, --method to method: none may hide the bad value
    p = run_cli(
        "distill", "--config", str(config), "--method", "vanilla", *SMALL_RUN, *RUN, "--out",
        str(tmp_path / "runs"), check=False, timeout=300,
    )  # fmt: skip
    line = _the_error_line(p)
    assert f"section {section!r} must be a mapping of keys (e.g. {section}: {{" in line, line
    assert line.endswith(got) and "run.yaml" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "sets",
    [["optim=5", "optim.lr=0.1"], ["optim=5"], ["train=[1]"], ["student=null"]],
    ids=["then-a-key", "alone", "a-list", "student-null"],
)
def test_set_of_a_section_to_a_value_is_refused(tmp_path, sets):
    section = sets[0].split("=")[0]
    args = [a for s in sets for a in ("--set", s)]
    p = run_cli(
        "distill", "--student", "conv4mp_w32", "--method", "vanilla", *SMALL_RUN, *RUN, *args, "--out",
        str(tmp_path / "runs"), check=False, timeout=300,
    )  # fmt: skip
    line = _the_error_line(p)
    assert f"--set {sets[0]!r}: section {section!r} must be a mapping of keys (e.g. --set {section}." in line
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------
# 2. a run name is a plain directory name inside --out


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "/tmp/elsewhere"])
def test_run_name_with_path_parts_is_refused_and_nothing_is_written(tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "runs"
    p = run_cli(
        "train", "--model", "conv4mp_w32", *SMALL_RUN, *RUN, "--out", str(out), "--name", name,
        check=False, timeout=300,
    )  # fmt: skip
    line = _the_error_line(p)
    assert f"name: {name!r} must be a plain directory name (no '/' or '..')" in line, line
    assert "use --out to choose where runs go" in line
    assert list(work.iterdir()) == [] and sorted(tmp_path.iterdir()) == [work]  # nothing, not even ../x


# ------------------------------------------------------------------------------------------------------
# 3. a batch of one image for MIMKD's in-batch negatives


@needs_fmnist
def test_mimkd_with_a_batch_of_one_is_one_line_naming_the_flag(tmp_path, tiny_teacher):
    out = tmp_path / "runs"
    p = run_cli(
        "distill", "--method", "mimkd", "--student", "conv4mp_w32", "--teacher", str(tiny_teacher),
        *SMALL_RUN, *RUN, "--batch-size", "1", "--out", str(out), check=False, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("mimkd: error: ")]
    assert len(errors) == 1 and "--batch-size 2 or more" in errors[0], p.stderr
    assert "drop_last" not in p.stderr and "spec §" not in p.stderr
    # anything else on stderr is a one-line mimkd warning (the memory bank's negatives), never a path
    assert all(x.startswith("mimkd: warning: ") for x in lines if x not in errors), p.stderr
    assert not out.exists() or not any(out.rglob("last.pt"))


# ------------------------------------------------------------------------------------------------------
# 4. mimkd's warnings are one line each


@needs_fmnist
def test_crd_on_a_small_set_prints_one_warning_line_without_a_file_path(tmp_path, tiny_teacher):
    p = run_cli(
        "distill", "--method", "crd", "--student", "conv4mp_w32", "--teacher", str(tiny_teacher),
        *SMALL_RUN, *RUN, "--set", "train.measure_latency=false", "--out", str(tmp_path), "--name", "crd",
        timeout=300,
    )  # fmt: skip
    warned = [x for x in p.stderr.splitlines() if "warning" in x.lower()]
    # three problems, one line each: K exceeds the class pools (the sampler), K is most of the pool, and
    # too few visits per sample for the bank's positives (the schedule warnings before training)
    assert len(warned) == 3, p.stderr
    assert all(w.startswith("mimkd: warning: ") for w in warned), warned
    assert (
        sum("num_negatives=" in w for w in warned) == 1 and sum("times in this run" in w for w in warned) == 1
    )
    assert ".py:" not in p.stderr and "UserWarning" not in p.stderr and "self.sampler" not in p.stderr
    assert json.loads((tmp_path / "crd" / "summary.json").read_text())["status"] == "finished"


# ------------------------------------------------------------------------------------------------------
# 5. a corrupt last.pt on --resume


@needs_fmnist
@pytest.mark.parametrize("keep", ["half", "3 bytes"])
def test_truncated_last_pt_on_resume_is_one_line_with_the_fix_and_keeps_the_file(tmp_path, keep):
    args = ["train", "--model", "conv4mp_w32", *SMALL_RUN, *RUN, "--set", "train.measure_latency=false"]
    args += ["--out", str(tmp_path), "--name", "r"]
    run_cli(*args, timeout=300)
    last, best = tmp_path / "r" / "last.pt", tmp_path / "r" / "best.pt"
    whole = last.read_bytes()
    cut = whole[: len(whole) // 2] if keep == "half" else whole[:3]  # 3 bytes: read as a (bad) pickle
    last.write_bytes(cut)
    best_before = best.read_bytes()
    line = _the_error_line(run_cli(*args, "--resume", check=False, timeout=300))
    assert f"cannot read checkpoint {str(last)!r}" in line and "truncated, corrupt" in line, line
    assert "start over with --overwrite" in line and "best.pt of the same run" in line, line
    assert "weights_only" not in line and "Weights only" not in line and "trusted source" not in line, line
    assert len(line) < 400, line
    assert last.read_bytes() == cut and best.read_bytes() == best_before  # nothing deleted or rewritten


# ------------------------------------------------------------------------------------------------------
# 6. a run cut short is near chance, not diverged


@needs_fmnist
def test_two_step_run_is_near_chance_not_diverged(tmp_path):
    # 2 steps at a learning rate of 1e-4: the student is still at its initialisation (about 10 %)
    p = run_cli(
        "train", "--model", "conv4mp_w32", *SMALL_RUN, *RUN, "--lr", "0.0001", "--set",
        "train.measure_latency=false", "--out", str(tmp_path), "--name", "short", timeout=300,
    )  # fmt: skip
    s = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert s["status"] == "finished" and s["last"]["top1"] < 15.0, s["last"]
    assert s["near_chance"] is True and s["diverged"] is False
    assert f"WARNING: test accuracy {s['last']['top1']:.2f} % is near chance (10.00 %)" in p.stdout, p.stdout
    assert "diverged" not in p.stdout and "diverged" not in p.stderr
