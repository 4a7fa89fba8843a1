"""The full-scale study files (configs/cifar100, configs/imagenet): format, names, options, published numbers.

Plain YAML checks against the format of configs/README.md, the method registry and the model zoo; spot checks
of transcribed numbers against the published tables (each expected value copied from the paper or README,
naming its table cell); and, when the study loader is importable, a full load and plan of every file.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import yaml

from mimkd.config import RunConfig, build_config
from mimkd.data.registry import available_datasets
from mimkd.distillers import available as available_methods
from mimkd.distillers.registry import get_method, validate_options
from mimkd.models import available as available_models

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = [
    "cifar100/table1.yaml",
    "cifar100/table2.yaml",
    "cifar100/benchmark_same_family.yaml",
    "cifar100/benchmark_cross_arch.yaml",
    "cifar100/wcord.yaml",
    "cifar100/ablation.yaml",
    "cifar100/transfer.yaml",
    "imagenet/resnet34_resnet18.yaml",
    "cifar100/logit_methods.yaml",
    "imagenet/logit_methods_r34_r18.yaml",
]

# The keys of the study-file format (configs/README.md).
TOP_KEYS = {
    "study",
    "description",
    "seeds",
    "base",
    "teachers",
    "pairs",
    "methods",
    "grid",
    "grid_rows",
    "exclude",
    "probe",
    "published",
    "published_source",
}
REQUIRED_KEYS = {"study", "description", "seeds", "base", "teachers", "pairs", "methods"}
TEACHER_KEYS = {"arch", "checkpoint", "train"}
PAIR_KEYS = {"teacher", "student", "label", "methods"}  # methods: the pair's own row options
PROBE_KEYS = {"datasets"}
ROW_RESERVED = {"name", "set"}  # the other keys of a row are the method's options


def load(rel: str) -> dict:
    with open(CONFIGS / rel) as f:
        return yaml.safe_load(f)


def pair_label(pair: dict) -> str:
    return pair.get("label") or f"{pair['teacher']}-{pair['student']}"


def row_method(row: str, opts: dict) -> str:
    return str(opts.get("name", row))


def row_options(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k not in ROW_RESERVED}


def pair_options(pair: dict, row: str, opts: dict) -> dict:
    """The row's options for ``pair``: the pair's own (``methods:`` of the pair) over the row's."""
    return {**row_options(opts), **row_options(pair.get("methods", {}).get(row, {}))}


def grid_points(study: dict) -> list[dict]:
    grid = study.get("grid") or {}
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]


def published(rel: str, pair: str, row: str):
    return load(rel)["published"][pair][row]


@pytest.fixture(params=FILES)
def study(request) -> tuple[str, dict]:
    return request.param, load(request.param)


# ------------------------------------------------------------------------------------------------------------
# Format and names


def test_keys_are_those_of_the_format(study):
    rel, s = study
    assert isinstance(s, dict), rel
    assert set(s) <= TOP_KEYS, f"{rel}: unknown keys {set(s) - TOP_KEYS}"
    assert set(s) >= REQUIRED_KEYS, f"{rel}: missing {REQUIRED_KEYS - set(s)}"
    assert isinstance(s["study"], str) and s["study"]
    assert isinstance(s["description"], str) and s["description"]
    assert isinstance(s["seeds"], int) and s["seeds"] >= 1
    for name, t in s["teachers"].items():
        assert set(t) <= TEACHER_KEYS, f"{rel}: teachers.{name}: {set(t) - TEACHER_KEYS}"
        assert ("checkpoint" in t) != ("train" in t), f"{rel}: teachers.{name} needs one of checkpoint/train"
    for p in s["pairs"]:
        assert set(p) <= PAIR_KEYS and {"teacher", "student"} <= set(p), f"{rel}: pair {p}"
    if "probe" in s:
        assert set(s["probe"]) <= PROBE_KEYS
    if "published" in s:
        assert isinstance(s.get("published_source"), str) and s["published_source"], rel


def test_study_names_are_unique():
    names = [load(rel)["study"] for rel in FILES]
    assert len(set(names)) == len(names)


def test_architectures_exist(study):
    rel, s = study
    zoo = set(available_models())
    for name, t in s["teachers"].items():
        assert t["arch"] in zoo, f"{rel}: teachers.{name}.arch {t['arch']!r}"
    for p in s["pairs"]:
        assert p["teacher"] in s["teachers"], f"{rel}: pair teacher {p['teacher']!r} not under teachers:"
        assert p["student"] in zoo, f"{rel}: student {p['student']!r}"
    labels = [pair_label(p) for p in s["pairs"]]
    assert len(set(labels)) == len(labels), rel
    used = {p["teacher"] for p in s["pairs"]}
    assert used == set(s["teachers"]), f"{rel}: unused teachers {set(s['teachers']) - used}"


def test_teacher_checkpoints_are_the_published_names(study):
    rel, s = study
    for name, t in s["teachers"].items():
        ckpt = t["checkpoint"]
        assert not Path(ckpt).is_absolute(), "relative to mimkd sweep --teachers DIR"
        if rel.startswith("cifar100/"):  # RepDistiller's names
            assert ckpt == f"{t['arch']}_vanilla/ckpt_epoch_240.pth", f"{rel}: teachers.{name}"
        else:  # torchvision's ImageNet weights file
            assert ckpt.startswith(f"{t['arch']}-") and ckpt.endswith(".pth"), f"{rel}: teachers.{name}"


def test_methods_and_options_are_accepted(study):
    rel, s = study
    methods = set(available_methods())
    assert s["methods"], rel
    for row, opts in s["methods"].items():
        assert isinstance(opts, dict), f"{rel}: methods.{row}"
        name = row_method(row, opts)
        assert name in methods, f"{rel}: methods.{row}: unknown method {name!r}"
        validate_options(name, row_options(opts))
        for point in grid_points(s):  # every grid point's method options too
            extra = {k.split(".", 1)[1]: v for k, v in point.items() if k.startswith("method.")}
            validate_options(name, {**row_options(opts), **extra})
        for p in s["pairs"]:  # and every pair's own options of the row
            assert set(p.get("methods", {})) <= set(s["methods"]), f"{rel}: pair {pair_label(p)}"
            validate_options(name, pair_options(p, row, opts))


def test_base_is_a_valid_run_configuration(study):
    rel, s = study
    assert s["base"]["data"]["name"] in available_datasets()
    for p in s["pairs"]:
        for row, opts in s["methods"].items():
            method = {"name": row_method(row, opts), **pair_options(p, row, opts)}
            teacher = s["teachers"][p["teacher"]]
            RunConfig.model_validate(
                {**s["base"], "student": {"arch": p["student"]}, "teacher": teacher, "method": method}
            ).resolved()


def test_published_labels_and_rows(study):
    rel, s = study
    labels = {pair_label(p) for p in s["pairs"]}
    rows = set(s["methods"]) | {"teacher"}
    probes = {f"probe.{d}" for d in s.get("probe", {}).get("datasets", [])}
    for pair, cells in s.get("published", {}).items():
        assert pair in labels, f"{rel}: published pair {pair!r} is not a pair of the file"
        for row, value in cells.items():
            assert row in rows, f"{rel}: published.{pair}.{row} is not a row"
            values = value.items() if isinstance(value, dict) else [("top1", value)]
            for metric, v in values:
                assert metric == "top1" or metric in probes, f"{rel}: {pair}.{row}: metric {metric!r}"
                if isinstance(v, list):  # [mean, std]
                    assert len(v) == 2 and 0 < v[0] <= 100 and 0 <= v[1] < 5, f"{rel}: {pair}.{row}"
                else:
                    assert isinstance(v, (int, float)) and 0 < v <= 100, f"{rel}: {pair}.{row}"


def test_published_baselines_agree_within_a_file(study):
    """A teacher's (student's) published accuracy is the same in every pair of a table that shares it."""
    rel, s = study
    pub = s.get("published", {})
    for who, row in (("teacher", "teacher"), ("student", "vanilla")):
        seen: dict[str, float] = {}
        for p in s["pairs"]:
            v = pub.get(pair_label(p), {}).get(row)
            if v is not None:
                assert seen.setdefault(p[who], v) == v, f"{rel}: {row} of {p[who]}"


def test_mimkd_tables_agree_except_the_vgg_teacher():
    """Tables 1 and 2 share students and teachers; their numbers agree but for Table 1's VGG-8 teacher."""
    t1, t2 = load("cifar100/table1.yaml"), load("cifar100/table2.yaml")
    for who, row in (("teacher", "teacher"), ("student", "vanilla")):
        v1 = {p[who]: t1["published"][pair_label(p)][row] for p in t1["pairs"]}
        v2 = {p[who]: t2["published"][pair_label(p)][row] for p in t2["pairs"]}
        for name in set(v1) & set(v2):
            if (who, name) == ("teacher", "vgg13"):
                # Table 1 prints "VGG-19" 74.63, Table 2 VGG-13 74.62 (the MIMKD paper's Table 1 footnote)
                assert (v1[name], v2[name]) == (74.63, 74.62)
            else:
                assert v1[name] == v2[name], (who, name)


# ------------------------------------------------------------------------------------------------------------
# Spot checks of transcribed numbers (expected values copied from the published tables)


@pytest.mark.parametrize(
    "rel, pair, row, expected",
    [
        # MIMKD paper Table 1, MIMKD row, WRN-16-1 / WRN-40-2 column
        ("cifar100/table1.yaml", "wrn_40_2-wrn_16_1", "mimkd", 70.20),
        # MIMKD paper Table 1, Teacher row, ResNet-8x4 / ResNet-32x4 (footnote 1: delta printed +3.80)
        ("cifar100/table1.yaml", "resnet32x4-resnet8x4", "teacher", 79.24),
        # MIMKD paper Table 1, KD row, ResNet-20 / ResNet-56 (footnote 2: delta printed +1.40)
        ("cifar100/table1.yaml", "resnet56-resnet20", "kd", 70.59),
        # MIMKD paper Table 1, Teacher row, VGG-8 / "VGG-19" column (taken as vgg13)
        ("cifar100/table1.yaml", "vgg13-vgg8", "teacher", 74.63),
        # MIMKD paper Table 1, Student row, ResNet-8 / ResNet-110
        ("cifar100/table1.yaml", "resnet110-resnet8", "vanilla", 59.63),
        # MIMKD paper Table 2, MIMKD row, ShuffleNetV2 / ResNet-50 (the abstract's 74.55)
        ("cifar100/table2.yaml", "ResNet50-ShuffleV2", "mimkd", 74.55),
        # MIMKD paper Table 2, AT row, WRN-16-1 / ResNet-110 (printed −0.59)
        ("cifar100/table2.yaml", "resnet110-wrn_16_1", "at", 66.42),
        # MIMKD paper Table 2, CRD row, MobileNetV2 / VGG-13
        ("cifar100/table2.yaml", "vgg13-MobileNetV2", "crd", 66.34),
        # RepDistiller README same-family table, SP row, c5 (resnet110 -> resnet32)
        ("cifar100/benchmark_same_family.yaml", "resnet110-resnet32", "sp", 72.69),
        # RepDistiller README same-family table, Teacher row, c6 (resnet32x4 -> resnet8x4)
        ("cifar100/benchmark_same_family.yaml", "resnet32x4-resnet8x4", "teacher", 79.42),
        # RepDistiller README same-family table, FitNet row, c4 (resnet110 -> resnet20)
        ("cifar100/benchmark_same_family.yaml", "resnet110-resnet20", "fitnets", 68.99),
        # RepDistiller README cross-architecture table, NST row, c1 (vgg13 -> MobileNetV2)
        ("cifar100/benchmark_cross_arch.yaml", "vgg13-MobileNetV2", "nst", 58.16),
        # RepDistiller README cross-architecture table, CRD row, c6 (wrn-40-2 -> ShuffleV1)
        ("cifar100/benchmark_cross_arch.yaml", "wrn_40_2-ShuffleV1", "crd", 76.05),
        # RepDistiller README cross-architecture table, Teacher row, c2 (ResNet50 -> MobileNetV2)
        ("cifar100/benchmark_cross_arch.yaml", "ResNet50-MobileNetV2", "teacher", 79.34),
        # WCoRD supplement Table 1, WCoRD+KD row, r32x4 -> r8x4
        ("cifar100/wcord.yaml", "resnet32x4-resnet8x4", "wcord+kd", [76.15, 0.14]),
        # WCoRD supplement Table 1, CRD+KD row, WRN-40-2 -> 40-1
        ("cifar100/wcord.yaml", "wrn_40_2-wrn_40_1", "crd+kd", [74.38, 0.11]),
        # WCoRD supplement Table 1, Student row, vgg13 -> vgg8
        ("cifar100/wcord.yaml", "vgg13-vgg8", "vanilla", 70.36),
        # MIMKD paper Table 3, "no distillation" row, both columns
        (
            "cifar100/transfer.yaml",
            "wrn_40_2-wrn_16_2",
            "vanilla",
            {"probe.stl10": 69.5, "probe.tinyimagenet": 33.8},
        ),
        # MIMKD paper Table 3, MIMKD row, both columns
        (
            "cifar100/transfer.yaml",
            "wrn_40_2-wrn_16_2",
            "mimkd",
            {"probe.stl10": 71.8, "probe.tinyimagenet": 36.2},
        ),
        # MIMKD paper abstract: ImageNet ResNet-18 68.88 -> 70.32 with a ResNet-34 teacher
        ("imagenet/resnet34_resnet18.yaml", "resnet34-resnet18", "vanilla", 68.88),
        ("imagenet/resnet34_resnet18.yaml", "resnet34-resnet18", "mimkd", 70.32),
    ],
)
def test_spot_check_published(rel, pair, row, expected):
    assert published(rel, pair, row) == expected


def test_fsp_not_available_is_left_out():
    # RepDistiller README same-family table, FSP row, c2 (wrn-40-2 -> wrn-40-1): "N/A"
    same = load("cifar100/benchmark_same_family.yaml")["published"]
    assert "fsp" not in same["wrn_40_2-wrn_40_1"]
    assert same["wrn_40_2-wrn_16_2"]["fsp"] == 72.91  # FSP row, c1
    # the cross-architecture table has no FSP row at all
    assert "fsp" not in load("cifar100/benchmark_cross_arch.yaml")["methods"]


def test_table_sizes():
    """Every row of every published table is transcribed (rows x columns of the published tables)."""
    sizes = {  # file: (pairs, method rows, published cells in all: rows incl. teacher x pairs)
        "cifar100/table1.yaml": (7, 7, 7 * 8),
        "cifar100/table2.yaml": (6, 7, 6 * 8),
        "cifar100/benchmark_same_family.yaml": (7, 14, 7 * 15 - 1),  # one FSP N/A
        "cifar100/benchmark_cross_arch.yaml": (6, 13, 6 * 14),
        "cifar100/wcord.yaml": (7, 5, 7 * 6),
        "cifar100/transfer.yaml": (1, 5, 5),  # no teacher row in Table 3
        # 7 method columns but vanilla; no teacher/student numbers in those READMEs; no CRD for ShuffleV2
        "cifar100/logit_methods.yaml": (7, 8, 7 * 7 - 1),
        "imagenet/logit_methods_r34_r18.yaml": (1, 4, 5),  # teacher, vanilla, kd, dkd, dist
    }
    for rel, (n_pairs, n_rows, n_cells) in sizes.items():
        s = load(rel)
        assert len(s["pairs"]) == n_pairs, rel
        assert len(s["methods"]) == n_rows, rel
        assert sum(len(cells) for cells in s["published"].values()) == n_cells, rel


# ------------------------------------------------------------------------------------------------------------
# Method settings the papers state


@pytest.mark.parametrize(
    "rel",
    [
        "cifar100/table1.yaml",
        "cifar100/table2.yaml",
        "cifar100/transfer.yaml",
        "imagenet/resnet34_resnet18.yaml",
    ],
)
def test_mimkd_paper_crd_uses_4096_negatives(rel):
    # the MIMKD paper: its CRD baselines use 4096 negatives (not RepDistiller's 16384)
    s = load(rel)
    assert validate_options("crd", row_options(s["methods"]["crd"])).num_negatives == 4096
    assert validate_options("mimkd", row_options(s["methods"]["mimkd"])).num_negatives == 4096


# RepDistiller's command-line weights (γ, α, β) per method (docs/methods/README.md)
REPDISTILLER_WEIGHTS = {
    "kd": (0.1, 0.9, None),
    "fitnets": (1, 0, 100),
    "at": (1, 0, 1000),
    "sp": (1, 0, 3000),
    "cc": (1, 0, 0.02),
    "vid": (1, 0, 1),
    "rkd": (1, 0, 1),
    "pkt": (1, 0, 30000),
    "ab": (1, 0, 1),
    "ft": (1, 0, 200),
    "fsp": (1, 0, 50),
    "nst": (1, 0, 50),
    "crd": (1, 0, 0.8),
    "crd+kd": (1, 1, 0.8),
}


@pytest.mark.parametrize("rel", ["cifar100/benchmark_same_family.yaml", "cifar100/benchmark_cross_arch.yaml"])
def test_benchmark_rows_use_repdistiller_weights(rel):
    s = load(rel)
    assert set(s["methods"]) - {"vanilla"} <= set(REPDISTILLER_WEIGHTS)
    for row, opts in s["methods"].items():
        if row == "vanilla":
            continue
        o = validate_options(row_method(row, opts), row_options(opts))
        gamma, alpha, beta = REPDISTILLER_WEIGHTS[row]
        assert (o.ce_weight, o.kd_weight) == (gamma, alpha), row
        if beta is not None:
            assert o.weight == beta, row
        if row == "kd":
            assert o.temperature == 4  # --kd_T 4
        if row == "crd":
            assert o.num_negatives == 16384  # RepDistiller's nce_k


def test_ablation_grid():
    s = load("cifar100/ablation.yaml")
    assert s["seeds"] == 1
    assert "published" not in s
    assert [pair_label(p) for p in s["pairs"]] == ["resnet32x4-resnet8x4"]  # the paper's ablation pair
    (row, opts), *others = s["methods"].items()
    assert not others and row_method(row, opts) == "mimkd"
    o = validate_options("mimkd", row_options(opts))
    assert o.global_estimator == "jsd" and o.ce_weight == 1.0  # JSD for all three terms, α = 1: the paper's
    steps = [0, 0.25, 0.5, 0.75, 1]
    assert s["grid"] == {"method.lambda_g": steps, "method.lambda_l": steps, "method.lambda_f": steps}
    points = grid_points(s)
    assert len(points) == 5 * 5 * 5
    assert len({tuple(p.values()) for p in points}) == 125


def test_transfer_probe():
    s = load("cifar100/transfer.yaml")
    assert s["probe"]["datasets"] == ["stl10", "tinyimagenet"]
    assert set(s["probe"]["datasets"]) <= set(available_datasets())
    assert set(s["methods"]) == {"vanilla", "kd", "at", "crd", "mimkd"}


# ------------------------------------------------------------------------------------------------------------
# The study loader (written alongside; skipped while it is not importable)


def expected_runs(s: dict, seeds: int) -> int:
    """Teacher rows run per pair, teacher-free rows once per student (configs/README.md)."""
    n = 0
    for row, opts in s["methods"].items():
        if get_method(row_method(row, opts)).requires_teacher:
            n += len(s["pairs"])
        else:
            n += len({p["student"] for p in s["pairs"]})
    return (n * len(grid_points(s)) - len(s.get("exclude", []))) * seeds


@pytest.mark.parametrize("rel", FILES)
def test_loader_plans_every_run(rel, tmp_path):
    study_mod = pytest.importorskip("mimkd.experiments.study")
    st = study_mod.load_study(CONFIGS / rel)
    s = load(rel)
    assert st.name == s["study"]
    runs = st.plan(seeds=1, out=tmp_path, teachers_dir=tmp_path / "teachers")
    students = [r for r in runs if r.kind == "student"]
    assert len(runs) == len(students), "every teacher is a checkpoint: no teacher runs"
    assert len(students) == expected_runs(s, 1)
    assert len({r.key for r in runs}) == len(runs)
    for r in students:
        assert r.key.startswith(f"{s['study']}/")
        if r.config.get("teacher"):
            assert r.config["teacher"]["checkpoint"].startswith(str(tmp_path / "teachers"))
    for pair, cells in s.get("published", {}).items():
        for row, value in cells.items():
            values = value.items() if isinstance(value, dict) else [("top1", value)]
            want = {m: (v[0], v[1]) if isinstance(v, list) else (v, None) for m, v in values}
            assert st.published(pair, row) == want, (pair, row)


# ------------------------------------------------------------------------------------------------------------
# The logit-methods studies: per-pair recipes, resolved as a run sees them

LOGIT = "cifar100/logit_methods.yaml"
LOGIT_IMAGENET = "imagenet/logit_methods_r34_r18.yaml"

# The CIFAR-100 table of docs/methods/{dkd,logit_std}.md and the LS README: pair -> (KD, CRD, DKD, MLKD,
# KD+LS, DKD+LS, MLKD+LS), the highest published; None: no published number.
LOGIT_PUBLISHED = {
    "resnet32x4-resnet8x4": (73.33, 75.51, 76.32, 77.08, 76.62, 77.01, 78.28),
    "vgg13-vgg8": (72.98, 73.94, 74.68, 75.18, 74.36, 74.81, 75.22),
    "wrn_40_2-wrn_40_1": (73.54, 74.14, 74.81, 75.35, 74.37, 74.89, 75.56),
    "wrn_40_2-wrn_16_2": (74.92, 75.48, 76.24, 76.63, 76.11, 76.39, 76.95),
    "resnet56-resnet20": (70.66, 71.16, 71.97, 72.19, 71.43, 72.32, 72.33),
    "resnet110-resnet32": (73.08, 73.48, 74.11, 74.11, 74.17, 74.29, 74.32),
    "resnet32x4-ShuffleV2": (74.45, None, 77.07, 78.44, 75.56, 77.37, 78.76),
}
LOGIT_ROWS = ("kd", "crd", "dkd", "mlkd", "kd+ls", "dkd+ls", "mlkd+ls")


def resolved(rel: str, tmp_path) -> dict[tuple[str, str], RunConfig]:
    """(pair label, row) -> the resolved run configuration of seed 0, planned by the study loader."""
    study_mod = pytest.importorskip("mimkd.experiments.study")
    runs = study_mod.load_study(CONFIGS / rel).plan(seeds=1, out=tmp_path, teachers_dir=tmp_path)
    return {(pair, r.row): build_config(copy.deepcopy(r.config)).resolved() for r in runs for pair in r.pairs}


def options_of(cfg: RunConfig):
    return validate_options(cfg.method.name, cfg.method.options)


@pytest.mark.parametrize(
    "pair, row, option, expected",
    [
        # mdistiller configs/cifar100/dkd/*.yaml, DKD.BETA (absent: cfg.py's 8.0)
        ("resnet56-resnet20", "dkd", "beta", 2.0),
        ("resnet110-resnet32", "dkd", "beta", 2.0),
        ("resnet32x4-resnet8x4", "dkd", "beta", 8.0),
        ("vgg13-vgg8", "dkd", "beta", 6.0),
        ("wrn_40_2-wrn_40_1", "dkd", "beta", 6.0),
        ("wrn_40_2-wrn_16_2", "dkd", "beta", 6.0),
        ("resnet32x4-ShuffleV2", "dkd", "beta", 8.0),
        ("resnet56-resnet20", "dkd", "temperature", 4.0),  # cfg.py DKD.T
        # LS log names (docs/methods/logit_std.md): DKD+LS τ, α, β
        ("resnet56-resnet20", "dkd+ls", "temperature", 3.0),  # dkd,resnet56,resnet20,3,18,2.0
        ("resnet56-resnet20", "dkd+ls", "alpha", 18.0),
        ("resnet56-resnet20", "dkd+ls", "beta", 36.0),
        ("vgg13-vgg8", "dkd+ls", "beta", 30.0),  # dkd,vgg13,vgg8,2,15,2.0
        ("wrn_40_2-wrn_16_2", "dkd+ls", "alpha", 12.0),  # dkd,wrn_40_2,wrn_16_2,2,12,2.0
        ("resnet32x4-resnet8x4", "dkd+ls", "beta", 72.0),  # dkd,resnet32x4,resnet8x4,2,9: 8 x 9
        ("resnet32x4-ShuffleV2", "dkd+ls", "temperature", 2.0),  # dkd,resnet32x4,ShuffleV2,2,9
        # KD+LS τ, weight
        ("vgg13-vgg8", "kd+ls", "temperature", 3.0),  # kd,vgg13,vgg8,3,9
        ("resnet56-resnet20", "kd+ls", "temperature", 2.0),  # kd,resnet56,resnet20,2,9
        ("resnet56-resnet20", "kd+ls", "kd_weight", 9.0),
        # MLKD: its cfg.py KD block; MLKD+LS: LS log names mlkd,TEACHER,STUDENT,τ,w
        ("resnet32x4-resnet8x4", "mlkd", "temperature", 4.0),
        ("resnet32x4-resnet8x4", "mlkd", "kd_weight", 0.9),
        ("resnet32x4-resnet8x4", "mlkd+ls", "kd_weight", 9.0),  # mlkd,resnet32x4,resnet8x4,2,9
        ("vgg13-vgg8", "mlkd+ls", "kd_weight", 6.0),  # mlkd,vgg13,vgg8,2,6
        ("resnet32x4-ShuffleV2", "mlkd+ls", "kd_weight", 6.0),  # mlkd,resnet32x4,ShuffleV2,2,6
        ("resnet32x4-ShuffleV2", "mlkd+ls", "temperature", 2.0),
    ],
)
def test_logit_methods_per_pair_options(tmp_path, pair, row, option, expected):
    assert getattr(options_of(resolved(LOGIT, tmp_path)[(pair, row)]), option) == expected


def test_logit_methods_solvers(tmp_path):
    runs = resolved(LOGIT, tmp_path)
    for (pair, row), cfg in runs.items():
        o = cfg.optim
        assert (o.batch_size, o.weight_decay, o.momentum, o.nesterov) == (64, 5e-4, 0.9, False), (pair, row)
        assert o.milestones == [150, 180, 210] and o.gamma == 0.1, (pair, row)
        shuffle = pair.endswith("ShuffleV2")
        if row in ("mlkd", "mlkd+ls"):
            # MLKD configs/cifar100/ours/*.yaml: lr 0.025 (0.01 res32x4_shuv2), 480 epochs as released;
            # MLKD+LS: LS configs/cifar100/mlkd/*.yaml and logs (vgg13_vgg8 lr 0.01; ShuffleV2 960 epochs)
            lr = 0.01 if shuffle or (row == "mlkd+ls" and pair == "vgg13-vgg8") else 0.025
            epochs = 960 if shuffle and row == "mlkd+ls" else 480
        else:  # RepDistiller's recipe = mdistiller's DKD configs = the LS KD/DKD logs
            lr, epochs = (0.01 if shuffle else 0.05), 240
        assert (o.lr, o.epochs) == (lr, epochs), (pair, row)


def test_logit_methods_published(tmp_path):
    study_mod = pytest.importorskip("mimkd.experiments.study")
    st = study_mod.load_study(CONFIGS / LOGIT)
    assert st.pair_labels() == list(LOGIT_PUBLISHED)
    for pair, values in LOGIT_PUBLISHED.items():
        for row, value in zip(LOGIT_ROWS, values):
            assert st.published(pair, row) == ({"top1": (value, None)} if value else {}), (pair, row)
        assert st.published(pair, "vanilla") == {} and st.published(pair, "teacher") == {}


def test_logit_methods_imagenet(tmp_path):
    runs = resolved(LOGIT_IMAGENET, tmp_path)
    pair = "resnet34-resnet18"
    dkd, dist, kd = runs[(pair, "dkd")], runs[(pair, "dist")], runs[(pair, "kd")]
    # mdistiller configs/imagenet/r34_r18/dkd.yaml: CE 1, BETA 0.5, T 1, WARMUP 1 (ALPHA: cfg.py's 1)
    o = options_of(dkd)
    assert (o.ce_weight, o.alpha, o.beta, o.temperature, o.warmup_epochs) == (1.0, 1.0, 0.5, 1.0, 1)
    # its SOLVER (kd.yaml's too): batch 512, 100 epochs, lr 0.2 x0.1 at 30/60/90, wd 1e-4, plain SGD
    for cfg in (dkd, kd):
        s = cfg.optim
        assert (s.batch_size, s.epochs, s.lr, s.milestones) == (512, 100, 0.2, [30, 60, 90])
        assert (s.weight_decay, s.momentum, s.nesterov, s.warmup_epochs) == (1e-4, 0.9, False, 0)
    k = options_of(kd)  # r34_r18/kd.yaml: T 1, CE 0.5, KD 0.5
    assert (k.temperature, k.ce_weight, k.kd_weight) == (1.0, 0.5, 0.5)
    # DIST resnet_dist.yaml: kd 'dist' (τ 1, β = γ = 1 x kd_loss_weight 2); lr 0.1, 32 x 8 GPUs, 100 epochs,
    # x0.1 every 30, wd 1e-4, SGD with Nesterov (args.py: --sgd-no-nesterov off)
    d = options_of(dist)
    assert (d.temperature, d.beta, d.gamma, d.ce_weight) == (1.0, 2.0, 2.0, 1.0)
    s = dist.optim
    assert (s.batch_size, s.epochs, s.lr, s.milestones, s.nesterov) == (256, 100, 0.1, [30, 60, 90], True)
    v = runs[(pair, "vanilla")].optim  # torchvision's ResNet recipe (our imagenet recipe)
    assert (v.batch_size, v.epochs, v.lr, v.milestones) == (256, 90, 0.1, [30, 60])
    study_mod = pytest.importorskip("mimkd.experiments.study")
    st = study_mod.load_study(CONFIGS / LOGIT_IMAGENET)
    # mdistiller README: DKD 71.70, KD 71.03; DIST_KD README: DIST 72.07, ResNet-34 73.31, ResNet-18 69.76
    want = {"dkd": 71.70, "dist": 72.07, "kd": 71.03, "teacher": 73.31, "vanilla": 69.76}
    assert {row: st.published(pair, row)["top1"][0] for row in want} == want
