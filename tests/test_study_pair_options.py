"""Per-pair options in study files (``pairs: [{..., methods: {ROW: {...}}}]``, configs/README.md): merging,
run keys and sharing, the errors, that studies without them plan exactly as before, and the report of the
logit-methods study (configs/cifar100/logit_methods.yaml) on a tiny real sweep."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from mimkd.errors import ConfigError
from mimkd.experiments.study import PlannedRun, load_study

from helpers import needs_fmnist, run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY_BASE = {
    "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.1},
    "optim": {"recipe": "fashion_mnist", "epochs": 2, "batch_size": 32},
    "train": {"progress": False, "eval_teacher": False, "tensorboard": False, "measure_latency": False},
}


def write_study(tmp: Path, **changes) -> Path:
    study = {
        "study": "pairs",
        "description": "per-pair options",
        "seeds": 1,
        "base": TINY_BASE,
        "teachers": {
            "t1": {"arch": "conv4mp_w32", "checkpoint": "t1.pt"},
            "t2": {"arch": "conv4mp_w32", "checkpoint": "t2.pt"},
        },
        "pairs": [{"teacher": "t1", "student": "conv4mp"}, {"teacher": "t2", "student": "conv4mp"}],
        "methods": {"vanilla": {}, "kd": {"kd_weight": 0.5, "set": ["optim.lr=0.02", "optim.epochs=3"]}},
    }
    study.update(changes)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def by_key(runs: list[PlannedRun]) -> dict[str, PlannedRun]:
    return {r.key: r for r in runs}


def plan_digest(runs: list[PlannedRun]) -> str:
    text = json.dumps([dataclasses.asdict(r) for r in runs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Studies without per-pair options plan exactly as before


def test_table1_plans_as_before_per_pair_options():
    # sha256 of every PlannedRun of configs/cifar100/table1.yaml (dataclasses.asdict, JSON with sorted
    # keys), planned with out="runs", teachers_dir="teachers" by the loader before pairs could carry options.
    # An edit of table1.yaml changes it as well; then recompute it with plan_digest().
    runs = load_study(CONFIGS / "cifar100/table1.yaml").plan(out="runs", teachers_dir="teachers")
    assert len(runs) == 7 * 6 * 3 + 6 * 3  # 6 teacher rows per pair, vanilla once per student (6), 3 seeds
    assert plan_digest(runs) == "cbc36f21aac367c06d6a7fa6036fb2e1f81f2472497c29fe6062db1dfb388a19"


def test_a_pair_without_options_plans_as_if_no_pair_had_them(tmp_path):
    data = yaml.safe_load((CONFIGS / "cifar100/logit_methods.yaml").read_text())
    plain = {**data, "pairs": [{k: v for k, v in p.items() if k != "methods"} for p in data["pairs"]]}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    with_options = by_key(load_study(CONFIGS / "cifar100/logit_methods.yaml").plan(seeds=1, out=tmp_path))
    without = by_key(load_study(tmp_path / "plain.yaml").plan(seeds=1, out=tmp_path))
    assert set(with_options) == set(without)  # no teacher-free row has per-pair options: the same keys
    own = {f"{p['teacher']}-{p['student']}": p.get("methods", {}) for p in data["pairs"]}
    for key, run in without.items():
        overridden = any(run.row in own[pair] for pair in run.pairs)
        assert (dataclasses.asdict(with_options[key]) == dataclasses.asdict(run)) != overridden, key


# ------------------------------------------------------------------------------------------------------------
# Merging, keys, sharing


def test_pair_options_merge_over_the_row_and_sets_come_after(tmp_path):
    pairs = [
        {
            "teacher": "t1",
            "student": "conv4mp",
            "methods": {"kd": {"temperature": 2.0, "set": ["optim.lr=0.01"]}},
        },
        {"teacher": "t2", "student": "conv4mp"},
    ]
    runs = by_key(load_study(write_study(tmp_path, pairs=pairs)).plan(out=tmp_path))
    own, plain = runs["pairs/t1-conv4mp/kd/seed0"], runs["pairs/t2-conv4mp/kd/seed0"]
    assert own.config["method"] == {"name": "kd", "kd_weight": 0.5, "temperature": 2.0}
    assert own.config["optim"]["lr"] == 0.01 and own.config["optim"]["epochs"] == 3  # the pair's set wins
    assert plain.config["method"] == {"name": "kd", "kd_weight": 0.5}
    assert plain.config["optim"]["lr"] == 0.02 and own.epochs == plain.epochs == 3
    # the vanilla row (no teacher) is still one run shared by both pairs
    shared = [r for r in runs.values() if r.row == "vanilla"]
    assert [r.key for r in shared] == ["pairs/student-conv4mp/vanilla/seed0"]
    assert shared[0].pairs == ["t1-conv4mp", "t2-conv4mp"]


def test_teacher_free_row_with_pair_options_is_shared_only_by_equal_options(tmp_path):
    short = {"vanilla": {"set": ["optim.epochs=1"]}}
    pairs = [
        {"teacher": "t1", "student": "conv4mp"},
        {"teacher": "t2", "student": "conv4mp"},
        {"teacher": "t1", "student": "conv4mp", "label": "c", "methods": short},
        {"teacher": "t2", "student": "conv4mp", "label": "d", "methods": short},
        {
            "teacher": "t2",
            "student": "conv4mp",
            "label": "e",
            "methods": {"vanilla": {"set": ["optim.epochs=4"]}},
        },
    ]
    runs = load_study(write_study(tmp_path, pairs=pairs, seeds=2)).plan(out=tmp_path)
    vanilla = {r.epochs: r for r in runs if r.row == "vanilla" and r.seed == 0}
    assert set(vanilla) == {1, 2, 4} and len({r.key for r in runs}) == len(runs)
    plain, one, four = vanilla[2], vanilla[1], vanilla[4]  # 2: TINY_BASE's epochs
    assert plain.key == "pairs/student-conv4mp/vanilla/seed0" and plain.pairs == ["t1-conv4mp", "t2-conv4mp"]
    assert one.pairs == ["c", "d"] and four.pairs == ["e"]
    for r in (one, four):
        head, tag = r.key.split("/")[2].split("@")
        assert head == "vanilla" and len(tag) == 8 and r.config["name"] == "seed0"
        assert r.config["out_dir"] == str(tmp_path / r.key.rsplit("/", 1)[0])
    assert one.key != four.key


def test_pair_options_apply_before_grid_points(tmp_path):
    pairs = [
        {"teacher": "t1", "student": "conv4mp", "methods": {"kd": {"kd_weight": 0.1, "temperature": 3.0}}}
    ]
    path = write_study(tmp_path, pairs=pairs, grid={"method.kd_weight": [0.7, 0.8]}, grid_rows=["kd"])
    kd = [r for r in load_study(path).plan(out=tmp_path) if r.row == "kd"]
    assert sorted(r.config["method"]["kd_weight"] for r in kd) == [0.7, 0.8]  # the grid point wins
    assert all(r.config["method"]["temperature"] == 3.0 for r in kd)


@pytest.mark.parametrize(
    "methods, message",
    [
        (
            {"kdd": {"temperature": 2.0}},
            r"study\.yaml'?: pair t1-conv4mp: methods\.kdd: 'kdd' is not a row.*kd",
        ),
        ({"kd": {"temprature": 2.0}}, r"(?s)pair t1-conv4mp: methods\.kd: .*temprature: unknown option"),
        ({"kd": {"name": "dkd"}}, r"pair t1-conv4mp: methods\.kd\.name: a pair cannot change a row's method"),
        ({"kd": {"set": "optim.lr=1"}}, r"pair t1-conv4mp: methods\.kd\.set must be a list"),
        ({"kd": {"temperature": -1}}, r"(?s)pair t1-conv4mp: methods\.kd: .*method\.temperature"),
    ],
)
def test_pair_option_errors_name_the_file_pair_and_row(tmp_path, methods, message):
    pairs = [{"teacher": "t1", "student": "conv4mp", "methods": methods}]
    with pytest.raises(ConfigError, match=message) as e:
        load_study(write_study(tmp_path, pairs=pairs))
    assert str(tmp_path / "study.yaml") in str(e.value)


def test_a_bad_pair_override_is_refused_naming_the_run(tmp_path):
    pairs = [{"teacher": "t1", "student": "conv4mp", "methods": {"kd": {"set": ["optim.lrr=1"]}}}]
    with pytest.raises(ConfigError, match=r"run pairs/t1-conv4mp/kd/seed0: .*optim\.lrr: unknown key"):
        load_study(write_study(tmp_path, pairs=pairs)).plan(out=tmp_path)


# ------------------------------------------------------------------------------------------------------------
# The report of the logit-methods study, on a tiny real sweep


def tiny_logit_study(tmp: Path, pair_label: str, rows: list[str]) -> Path:
    """configs/cifar100/logit_methods.yaml cut to one pair and ``rows``, with its per-pair method options
    but Fashion-MNIST stand-in training (2 % of the data, 2 epochs; the teacher trained 4 epochs by the sweep)
    instead of the CIFAR-100 recipes (the rows' and pairs' ``set:`` entries)."""
    s = yaml.safe_load((CONFIGS / "cifar100/logit_methods.yaml").read_text())
    (pair,) = [p for p in s["pairs"] if f"{p['teacher']}-{p['student']}" == pair_label]
    no_sets = {r: {k: v for k, v in o.items() if k != "set"} for r, o in pair.get("methods", {}).items()}
    pair = {**pair, "methods": {r: o for r, o in no_sets.items() if r in rows and o}}
    study = {
        **s,
        "seeds": 1,
        "base": TINY_BASE,
        "teachers": {pair["teacher"]: {"arch": pair["teacher"], "train": {"optim": {"epochs": 4}}}},
        "pairs": [pair],
        "methods": {r: {k: v for k, v in s["methods"][r].items() if k != "set"} for r in rows},
        "published": {pair_label: {r: v for r, v in s["published"][pair_label].items() if r in rows}},
    }
    path = tmp / "logit_methods.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@needs_fmnist
def test_report_compares_the_logit_rows_with_published(tmp_path):
    rows = ["vanilla", "dkd", "kd+ls", "mlkd"]
    path = tiny_logit_study(tmp_path, "resnet56-resnet20", rows)
    planned = {r.row: r for r in load_study(path).plan(out=tmp_path / "out")}
    assert planned["dkd"].config["method"]["beta"] == 2.0  # the pair's own β came through
    out = tmp_path / "out"
    run_cli("sweep", str(path), "--out", str(out), "--jobs", "2", "--threads", "1", "--no-progress")
    study_dir = out / "logit_methods"
    run_cli("report", str(study_dir), "--compare-published", "--no-plots", "--no-latency")
    text = (study_dir / "report.md").read_text()
    assert "Published numbers: KD, CRD: RepDistiller README" in text
    lines = {
        ln.split(" | ")[0].removeprefix("| "): ln.split(" | ")
        for ln in text.splitlines()
        if ln.startswith("| ")
    }
    published = {"dkd": 71.97, "kd+ls": 71.43, "mlkd": 72.19}  # the study's resnet56-resnet20 cells
    for row, pub in published.items():
        summary = json.loads((out / planned[row].key / "summary.json").read_text())
        assert summary["status"] == "finished" and not summary.get("near_chance"), row
        last = summary["last"]["top1"]
        cells = lines[row]
        assert cells[1] == f"{last:.2f} ± 0.00" and cells[4] == f"{pub:.2f}", row
        assert cells[5] == f"{last - pub:+.2f}" and cells[6] == "1/1", row
    assert lines["vanilla"][4] == "–" and lines["vanilla"][5] == ""  # no published vanilla number
