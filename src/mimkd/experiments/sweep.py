"""``mimkd sweep FILE``: a study's runs — teachers first, then every student run — skipping finished runs,
resuming interrupted ones, optionally one shard of them (``--shard i/n``, for a cluster job array).

Sharding splits the student runs (sorted by run directory) round-robin; each shard trains or reads back the
teachers its runs need. On a file system shared by the shards, train the teachers once first
(``--stage teachers``) so that two shards never write the same teacher's directory.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from mimkd.errors import ConfigError
from mimkd.teachers.resolve import is_teacher_name

from .pool import Job, finished_summary, run_jobs
from .study import PlannedRun, Study, load_study, point_label

__all__ = ["sweep", "parse_shard", "probe_runs"]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``'2/8'`` -> (2, 8): the second of eight shards (1-based)."""
    if not text:
        return 1, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 2/8") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 2/8")
    return i, n


def probe_runs(run_dir: Path, datasets: list[str], roots: dict[str, str], epochs: int, lr: float) -> dict:
    """The linear probes of a finished student (MIMKD's Table 3), each kept as ``probe_<data>.json``."""
    from mimkd.engine.linear_probe import linear_probe, write_probe_result

    out = {}
    for data in datasets:
        path = run_dir / f"probe_{data}.json"
        if path.exists():
            out[f"probe.{data}"] = json.loads(path.read_text())["test_top1"]
            continue
        res = linear_probe(run_dir / "last.pt", data, roots.get(data), epochs=epochs, lr=lr)
        write_probe_result(res, path)
        out[f"probe.{data}"] = res["test_top1"]
    return {"probes": out}


def _status(run: PlannedRun, out: Path, probes: list[str]) -> str:
    run_dir = out / run.key
    s = finished_summary(run_dir, run.epochs)
    if s is not None:
        missing = (
            [d for d in probes if not (run_dir / f"probe_{d}.json").exists()] if run.kind == "student" else []
        )
        if s.get("status") == "diverged":
            return "diverged"
        return f"finished, probe {'+'.join(missing)} to do" if missing else "finished"
    if (run_dir / "last.pt").exists():
        return "interrupted: resumes"
    return "to run"


def write_manifest(study: Study, runs: list[PlannedRun], out: Path, seeds: int) -> Path:
    """``OUT/STUDY/study.yaml`` (the file as given) and ``sweep.json`` (every planned run), for the report."""
    d = out / study.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "study.yaml").write_text(study.text)
    manifest = {
        "study": study.name,
        "seeds": seeds,
        "runs": [
            {
                "key": r.key,
                "kind": r.kind,
                "row": r.row,
                "seed": r.seed,
                "pairs": r.pairs,
                "student": r.student,
                "point": r.point,
                "epochs": r.epochs,
            }
            for r in runs
        ],
    }
    tmp = d / ".sweep.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, d / "sweep.json")
    return d


def sweep(
    path: str | Path,
    *,
    seeds: int | None = None,
    out: str | Path = "runs",
    teachers_dir: str | Path | None = None,
    shard: str | None = None,
    stage: str = "all",
    dry_run: bool = False,
    jobs: int | None = None,
    threads: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Expand the study at ``path`` and do (or, with ``dry_run``, list) what is left of it."""
    study = load_study(path)
    out = Path(out)
    n_seeds = seeds or study.spec.seeds
    planned = study.plan(n_seeds, out, teachers_dir)
    i, n = parse_shard(shard)
    all_students = [r for r in planned if r.kind == "student"]
    share = {r.key for r in sorted(all_students, key=lambda r: r.key)[i - 1 :: n]}
    # seed 0 of every row first, then seed 1...: a partial sweep already covers every row
    students = sorted((r for r in all_students if r.key in share), key=lambda r: r.seed)
    if stage == "teachers":
        students = []
    needed = {r.needs for r in students if r.needs} if stage != "teachers" else None
    teachers = [r for r in planned if r.kind == "teacher" and (needed is None or r.key in needed)]
    probe = study.spec.probe
    probes = probe.datasets if probe else []
    missing = _missing_teachers(students, teachers)
    if missing and not dry_run:
        ckpt, key = missing[0]
        raise ConfigError(
            f"teacher checkpoint {ckpt!r} (run {key}) does not exist: pass --teachers DIR with the study's "
            f"teacher checkpoints (paths in the study file are relative to it); {len(missing)} run(s) need it"
        )

    lines = [f"study {study.name}: {len(teachers)} teacher run(s), {len(students)} student run(s)"]
    if n > 1:
        lines[0] += f" (shard {i}/{n})"
    status = {r.key: _status(r, out, probes) for r in teachers + students}
    for r in teachers + students:
        where = f"  {r.key}"
        lines.append(f"{where:<72} {r.epochs:>3} ep  {status[r.key]}")
    if dry_run:
        for ckpt in sorted({c for c, _ in missing}):
            lines.append(f"missing teacher checkpoint: {ckpt} (pass --teachers DIR)")
        print("\n".join(lines))
        return {"planned": len(teachers) + len(students), "status": status}
    write_manifest(study, planned, out, n_seeds)
    todo = sum(1 for s in status.values() if s != "finished" and s != "diverged")
    print(lines[0] + f"; {todo} to do, the rest finished", file=sys.stderr)

    after = None
    if probe:
        after = functools.partial(
            probe_runs, datasets=probes, roots=probe.roots, epochs=probe.epochs, lr=probe.lr
        )
    results: list[tuple[Job, dict[str, Any]]] = []
    for phase, runs, follow in (("teachers", teachers, None), ("students", students, after)):
        batch = []
        for r in runs:
            done = finished_summary(out / r.key, r.epochs)
            if done is not None and r.kind == "student":
                _same_teacher(r, done, out)
            if done is not None and follow is not None and status[r.key].startswith("finished,"):
                done = None  # finished, but its probes are still to do
            batch.append(Job(r, r.config, follow, done, r.epochs))
        if not batch:
            continue
        results += run_jobs(
            batch, jobs, threads, desc=f"{study.name} {phase}", progress=progress, on_result=_announce
        )
        if phase == "teachers":
            failed = [(j.tag.key, s.get("error")) for j, s in results if s.get("status") != "finished"]
            if failed:
                raise ConfigError(f"teacher run {failed[0][0]} did not finish: {failed[0][1]}")
    failed = [(j.tag.key, s) for j, s in results if s.get("status") not in ("finished", "diverged")]
    for key, s in failed:
        print(f"failed: {key}: {s.get('error')}", file=sys.stderr)
    return {"study": study.name, "out": str(out / study.name), "runs": len(results), "failed": len(failed)}


def _same_teacher(r: PlannedRun, summary: dict[str, Any], out: Path) -> None:
    """A finished student is read back only if its teacher is still the one it was distilled from."""
    from mimkd.engine.identity import changed_teacher

    changed = changed_teacher(summary, (r.config.get("teacher") or {}).get("checkpoint"))
    if changed:
        raise ConfigError(
            f"finished run {r.key}: {changed}; put the original teacher back, or delete {str(out / r.key)!r} "
            "to distil it again from the new one"
        )


def _announce(job: Job, summary: dict[str, Any]) -> None:
    r: PlannedRun = job.tag
    top1 = (summary.get("last") or {}).get("top1")
    acc = f"{top1:.2f} %" if isinstance(top1, (int, float)) else summary.get("status")
    extra = f" [{point_label(r.point)}]" if r.point else ""
    print(f"done: {r.key}{extra}: {acc}", file=sys.stderr)


def _missing_teachers(students: list[PlannedRun], teachers: list[PlannedRun]) -> list[tuple[str, str]]:
    """(checkpoint, run key) of every given teacher checkpoint that does not exist."""
    trained = {t.key for t in teachers}
    out = []
    for r in students:
        t = r.config.get("teacher")
        if (
            t
            and r.needs not in trained
            and not Path(t["checkpoint"]).exists()
            and not is_teacher_name(t["checkpoint"])  # fetched by the run itself
        ):
            out.append((t["checkpoint"], r.key))
    return out
