"""Study files: one paper table, grid or comparison, expanded into ordinary run configurations.

The format is documented in ``configs/README.md``. :func:`load_study` validates the whole file before any
work starts (unknown keys, unknown methods or options, unknown architectures, published numbers for pairs or
rows the study does not have), and :meth:`Study.plan` expands it into :class:`PlannedRun` s: every pair ×
every method row (× every grid point) × every seed, plus the teachers the sweep must train first.

Run directories: ``OUT/STUDY/PAIR/ROW[/POINT]/seedK``; a row whose method needs no teacher (``vanilla``,
``dml``, ``dcm``) runs once per student, in ``OUT/STUDY/student-ARCH/ROW/...``, and is shared by every pair
with that student. Teachers trained by a sweep live in ``OUT/teachers/NAME_HASH`` (HASH of their
configuration), so studies that need the same teacher train it once.

A pair may change a row for itself alone (``pairs: [{..., methods: {ROW: {OPTION: VALUE, set: [...]}}}]``:
the published recipes differ per pair): its options are merged over the row's, its ``set`` entries applied
after the row's. A teacher-free row with such options runs in ``OUT/STUDY/student-ARCH/ROW@HASH/...`` (HASH of
the pair's options for it), shared only by the pairs that give it the same options.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mimkd.config import _deep_merge, apply_overrides, build_config, read_yaml
from mimkd.errors import ConfigError, did_you_mean
from mimkd.teachers.resolve import is_teacher_name

__all__ = ["Study", "PlannedRun", "load_study", "point_label", "PublishedValue"]

PublishedValue = float | list[float] | dict[str, float | list[float]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(_Strict):
    """A teacher: a trained checkpoint, or a training run (a run-config fragment over ``base``)."""

    arch: str
    checkpoint: str | None = None
    train: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give one of checkpoint: (a trained teacher) or train: (the sweep trains it)")
        return self


class PairSpec(_Strict):
    teacher: str
    student: str
    label: str | None = None
    # row label -> this pair's own options of the row (merged over the row's) and ``set`` overrides (after
    # the row's), e.g. DKD's β per pair: {dkd: {beta: 2.0}}
    methods: dict[str, dict[str, Any]] = {}


class ExcludeSpec(_Strict):
    pair: str
    row: str


class ProbeSpec(_Strict):
    """The linear-probe transfer of every finished student (docs/methods/mimkd.md), on each dataset."""

    datasets: list[str]
    roots: dict[str, str] = {}
    epochs: int = Field(100, ge=1)
    lr: float = Field(0.1, gt=0.0)


class StudyFile(_Strict):
    study: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    description: str = ""
    seeds: int = Field(1, ge=1)
    base: dict[str, Any] = {}
    teachers: dict[str, TeacherSpec] = {}
    pairs: list[PairSpec]
    methods: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]] = {}
    grid_rows: list[str] | None = None  # rows the grid applies to (default: every row)
    exclude: list[ExcludeSpec] = []  # cells that cannot run (e.g. FSP on unequal channel counts)
    probe: ProbeSpec | None = None
    published: dict[str, dict[str, PublishedValue]] = {}
    published_source: str = ""


@dataclass
class PlannedRun:
    """One run of a study: where it lives, what it is, and its complete run configuration."""

    key: str  # run directory relative to OUT (e.g. "table1/resnet32x4-resnet8x4/kd/seed0")
    kind: str  # "teacher" or "student"
    row: str  # method row label (the teacher's name for teacher runs)
    seed: int
    config: dict[str, Any]
    pairs: list[str] = field(default_factory=list)  # the pair labels this run serves
    student: str = ""
    point: dict[str, Any] = field(default_factory=dict)  # grid coordinates (dotted key -> value)
    needs: str | None = None  # key of the teacher run it waits for
    epochs: int = 0  # resolved (the recipe's when the config leaves it unset)


def point_label(point: dict[str, Any]) -> str:
    """``{'method.lambda_g': 0, 'method.lambda_l': 0.5}`` -> ``'lambda_g=0,lambda_l=0.5'``."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())


class Study:
    """A validated study file."""

    def __init__(self, spec: StudyFile, path: Path | None = None, text: str = "") -> None:
        self.spec = spec
        self.path = path
        self.text = text
        self.name = spec.study

    # ------------------------------------------------------------------------------------------------
    def pair_label(self, p: PairSpec) -> str:
        return p.label or f"{p.teacher}-{p.student}"

    def pair_labels(self) -> list[str]:
        return [self.pair_label(p) for p in self.spec.pairs]

    def row_method(self, row: str) -> str:
        return str(self.spec.methods[row].get("name", row))

    def row_options(self, row: str) -> dict[str, Any]:
        return {k: v for k, v in self.spec.methods[row].items() if k not in ("name", "set")}

    def pair_row(self, p: PairSpec, row: str) -> tuple[dict[str, Any], list[str]]:
        """The row's method options and ``set`` overrides for pair ``p``: the pair's own (``methods:`` of the
        pair) merged over the row's options, its ``set`` entries after the row's."""
        own = p.methods.get(row, {})
        options = {**self.row_options(row), **{k: v for k, v in own.items() if k != "set"}}
        return options, [*self.spec.methods[row].get("set", []), *own.get("set", [])]

    def grid_points(self, row: str) -> list[dict[str, Any]]:
        rows = self.spec.grid_rows
        if not self.spec.grid or (rows is not None and row not in rows):
            return [{}]
        keys = list(self.spec.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.spec.grid.values())]

    # ------------------------------------------------------------------------------------------------
    def plan(
        self,
        seeds: int | None = None,
        out: str | Path = "runs",
        teachers_dir: str | Path | None = None,
    ) -> list[PlannedRun]:
        """Every run of the study (teachers first), with complete, validated run configurations."""
        from mimkd.distillers.registry import get_method

        out = Path(out)
        n_seeds = seeds or self.spec.seeds
        teacher_runs, teacher_ckpt = self._teachers(out, teachers_dir)
        runs: dict[str, PlannedRun] = {}
        excluded = {(e.pair, e.row) for e in self.spec.exclude}
        for p in self.spec.pairs:
            label = self.pair_label(p)
            for row in self.spec.methods:
                if (label, row) in excluded:
                    continue
                needs_teacher = get_method(self.row_method(row)).requires_teacher
                where = self._row_dir(p, row, needs_teacher)
                trained = teacher_runs.get(p.teacher) if needs_teacher else None
                ckpt = teacher_ckpt[p.teacher] if needs_teacher else None
                for point in self.grid_points(row):
                    for seed in range(n_seeds):
                        parts = [where, *([point_label(point)] if point else []), f"seed{seed}"]
                        key = "/".join([self.name, *parts])
                        if key in runs:
                            runs[key].pairs.append(label)
                            continue
                        cfg = self._student_config(p, row, point, seed, ckpt, out / key)
                        runs[key] = PlannedRun(
                            key, "student", row, seed, cfg, [label], p.student, point, trained and trained.key
                        )
        used = {r.needs for r in runs.values() if r.needs}
        teachers = [r for r in teacher_runs.values() if r.key in used]
        planned = teachers + list(runs.values())
        for r in planned:
            _validate_run(r)
        return planned

    def _teachers(
        self, out: Path, teachers_dir: str | Path | None
    ) -> tuple[dict[str, PlannedRun], dict[str, str]]:
        """The teacher runs the sweep trains (by teacher name) and every teacher's checkpoint path."""
        teacher_runs: dict[str, PlannedRun] = {}
        teacher_ckpt: dict[str, str] = {}
        for name, t in self.spec.teachers.items():
            if t.checkpoint is not None and is_teacher_name(t.checkpoint):
                teacher_ckpt[name] = t.checkpoint  # a catalogue name: the run fetches it (docs/teachers.md)
                continue
            if t.checkpoint is not None:
                path = Path(t.checkpoint).expanduser()
                if not path.is_absolute() and teachers_dir is not None:
                    path = Path(teachers_dir).expanduser() / path
                teacher_ckpt[name] = str(path)
                continue
            cfg = _deep_merge(copy.deepcopy(self.spec.base), copy.deepcopy(t.train or {}))
            cfg.update(student={"arch": t.arch}, method={"name": "vanilla"})
            cfg.setdefault("seed", 0)
            cfg.pop("teacher", None)
            digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
            cfg.update(out_dir=str(out / "teachers"), name=f"{name}_{digest}")
            key = f"teachers/{name}_{digest}"
            run = PlannedRun(key, "teacher", name, int(cfg["seed"]), cfg, student=t.arch)
            teacher_runs[name] = run
            teacher_ckpt[name] = str(out / run.key / "last.pt")
        return teacher_runs, teacher_ckpt

    def _row_dir(self, p: PairSpec, row: str, needs_teacher: bool) -> str:
        """``PAIR/ROW``; ``student-ARCH/ROW`` for a teacher-free row (shared by the pairs with that student),
        ``student-ARCH/ROW@HASH`` when the pair gives the row its own options (shared by the pairs giving the
        same ones, HASH of them)."""
        if needs_teacher:
            return f"{self.pair_label(p)}/{row}"
        own = p.methods.get(row)
        if not own:
            return f"student-{p.student}/{row}"
        digest = hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:8]
        return f"student-{p.student}/{row}@{digest}"

    def _student_config(
        self, p: PairSpec, row: str, point: dict[str, Any], seed: int, ckpt: str | None, run_dir: Path
    ) -> dict[str, Any]:
        """The run configuration of one student run (``ckpt``: its teacher's checkpoint, None: no teacher)."""
        options, sets = self.pair_row(p, row)
        cfg = copy.deepcopy(self.spec.base)
        cfg.update(student={**cfg.get("student", {}), "arch": p.student})
        cfg["method"] = {"name": self.row_method(row), **copy.deepcopy(options)}
        cfg["seed"] = seed
        cfg.pop("teacher", None)
        if ckpt is not None:
            cfg["teacher"] = {"arch": self.spec.teachers[p.teacher].arch, "checkpoint": ckpt}
        sets += [f"{k}={json.dumps(v)}" for k, v in point.items()]
        apply_overrides(cfg, sets)
        cfg.update(out_dir=str(run_dir.parent), name=run_dir.name)
        return cfg

    def published(self, pair: str, row: str) -> dict[str, tuple[float, float | None]]:
        """A cell's published values, ``{metric: (mean, std or None)}`` (metric ``top1`` for numbers)."""
        value = self.spec.published.get(pair, {}).get(row)
        if value is None:
            return {}
        items = value.items() if isinstance(value, dict) else [("top1", value)]
        out = {}
        for metric, v in items:
            out[metric] = (float(v[0]), float(v[1])) if isinstance(v, list) else (float(v), None)
        return out


def _validate_run(run: PlannedRun) -> None:
    try:  # the configuration only: a teacher checkpoint may not exist yet (the sweep trains it)
        run.epochs = int(build_config(copy.deepcopy(run.config)).resolved().optim.epochs)
    except ConfigError as e:
        raise ConfigError(f"run {run.key}: {e}") from None


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (see ``configs/README.md``); raises ConfigError naming the problem."""
    path = Path(path)
    data = read_yaml(path)
    try:
        spec = StudyFile.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                fields = list(StudyFile.model_fields) if len(err["loc"]) == 1 else []
                hint = did_you_mean(str(err["loc"][-1]), fields) if fields else ""
                lines.append(f"{loc}: unknown key.{hint}")
            else:
                lines.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"study file {str(path)!r} is invalid:\n  " + "\n  ".join(lines)) from None
    _check_names(spec, path)
    return Study(spec, path, path.read_text())


def study_from_text(text: str) -> Study:
    """A study from the copy a sweep keeps in its directory (``study.yaml``)."""
    spec = StudyFile.model_validate(yaml.safe_load(text))
    return Study(spec, None, text)


def _check_names(spec: StudyFile, path: Path) -> None:
    from mimkd.distillers.registry import validate_options
    from mimkd.models.registry import model_factory

    where = f"study file {str(path)!r}"
    for p in spec.pairs:
        if p.teacher not in spec.teachers:
            hint = did_you_mean(p.teacher, list(spec.teachers))
            raise ConfigError(f"{where}: pair teacher {p.teacher!r} is not under teachers:.{hint}")
        for arch in (p.student, spec.teachers[p.teacher].arch):
            if ":" not in arch:
                model_factory(arch)  # an unknown zoo name: a ModelError with suggestions
    for row, opts in spec.methods.items():
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: methods.{row} must be a mapping of options (or {{}})")
        sets = opts.get("set", [])
        if not isinstance(sets, list):
            raise ConfigError(f"{where}: methods.{row}.set must be a list of KEY=VALUE strings")
        options = {k: v for k, v in opts.items() if k not in ("name", "set")}
        validate_options(str(opts.get("name", row)), options)
    for row in spec.grid_rows or []:
        if row not in spec.methods:
            raise ConfigError(f"{where}: grid_rows names {row!r}, not a row of methods:")
    labels = [p.label or f"{p.teacher}-{p.student}" for p in spec.pairs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: two pairs share a label; give one of them label:")
    for p, label in zip(spec.pairs, labels):
        _check_pair_methods(spec, p, f"{where}: pair {label}")
    for e in spec.exclude:
        if e.pair not in labels or e.row not in spec.methods:
            raise ConfigError(
                f"{where}: exclude: {{pair: {e.pair}, row: {e.row}}} names no cell of the study"
            )
    for pair, rows in spec.published.items():
        if pair not in labels:
            hint = did_you_mean(pair, labels)
            raise ConfigError(f"{where}: published: {pair!r} is not a pair label.{hint}")
        for row in rows:
            if row not in spec.methods and row != "teacher":
                hint = did_you_mean(row, [*spec.methods, "teacher"])
                raise ConfigError(f"{where}: published.{pair}: {row!r} is not a row of methods.{hint}")


def _check_pair_methods(spec: StudyFile, p: PairSpec, where: str) -> None:
    """A pair's own row options (``methods:`` of the pair): rows of the study, valid merged options."""
    from mimkd.distillers.registry import validate_options

    for row, own in p.methods.items():
        if row not in spec.methods:
            hint = did_you_mean(row, list(spec.methods))
            raise ConfigError(f"{where}: methods.{row}: {row!r} is not a row of methods:.{hint}")
        if "name" in own:
            raise ConfigError(
                f"{where}: methods.{row}.name: a pair cannot change a row's method; add a row under methods:"
            )
        if not isinstance(own.get("set", []), list):
            raise ConfigError(f"{where}: methods.{row}.set must be a list of KEY=VALUE strings")
        row_opts = spec.methods[row]
        options = {k: v for k, v in {**row_opts, **own}.items() if k not in ("name", "set")}
        try:
            validate_options(str(row_opts.get("name", row)), options)
        except ConfigError as e:
            raise ConfigError(f"{where}: methods.{row}: {e}") from None
