"""``mimkd report DIR``: a study's runs as a markdown table (+ JSON) and plots, next to published numbers.

For every pair and method row: mean ± sample std over seeds of the **last** epoch's test top-1 (what the
papers report) and of the **best** epoch's (selected on the test set, hence optimistic: shown so the two can
be told apart), the gain of the last-epoch mean over the vanilla student, and with ``--compare-published``
the published number and our difference to it. Runs that finished near chance accuracy, diverged (stopped by
a non-finite loss), failed or were interrupted are counted, by outcome, and left out of the means; runs not
started yet are counted as missing. Plots: training curves per pair, the ablation contours of a
grid (pairs of grid keys, the others fixed, as the MIMKD paper's Fig. 3), and accuracy against single-image
CPU latency (measured here by :func:`mimkd.evaluation.latency.latency_profile`: median of many batch-1 calls,
one thread and all threads, cached in ``DIR/latency.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimkd.engine.summary import count_outcomes, describe_counts, run_outcome
from mimkd.errors import ConfigError

from .pool import mean_std_of
from .study import Study, point_label, study_from_text

__all__ = ["report", "collect", "RunRecord"]


@dataclass
class RunRecord:
    key: str
    kind: str
    row: str
    seed: int
    pairs: list[str]
    student: str
    point: dict[str, Any]
    summary: dict[str, Any] | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    started: bool = False  # its directory holds a checkpoint
    run_dir: Path | None = None

    @property
    def outcome(self) -> str:
        """``ok``, ``near_chance``, ``diverged``, ``failed``, ``interrupted`` or ``missing`` (not started)."""
        if self.summary is None:
            return "interrupted" if self.started else "missing"
        return run_outcome(self.summary)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def value(self, metric: str) -> float | None:
        s = self.summary or {}
        if metric == "top1":
            return (s.get("last") or {}).get("top1")
        if metric == "best":
            return (s.get("best") or {}).get("top1")
        if metric.startswith("probe."):
            return (s.get("probes") or {}).get(metric)
        return s.get(metric)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(study_dir: str | Path) -> tuple[Study, list[RunRecord]]:
    """The study (from its ``study.yaml`` copy) and one record per planned run, read from its directory."""
    d = Path(study_dir)
    manifest = _read_json(d / "sweep.json")
    if manifest is None or not (d / "study.yaml").exists():
        raise ConfigError(
            f"{str(d)!r} is not a study directory (no sweep.json / study.yaml): give OUT/STUDY of a "
            "mimkd sweep, e.g. runs/table1"
        )
    study = study_from_text((d / "study.yaml").read_text())
    out = d.parent
    records = []
    for r in manifest["runs"]:
        rec = RunRecord(r["key"], r["kind"], r["row"], r["seed"], r["pairs"], r["student"], r["point"])
        run_dir = out / r["key"]
        rec.summary = _read_json(run_dir / "summary.json")
        s = rec.summary
        if s is not None and s.get("status") == "finished" and s.get("epochs") != r["epochs"]:
            rec.summary = None  # a run of another length in the same directory: not this study's
        if rec.summary is not None:
            probes = {}
            for p in run_dir.glob("probe_*.json"):
                res = _read_json(p)
                if res:
                    probes[f"probe.{res['dataset']}"] = res["test_top1"]
            rec.summary["probes"] = probes
        rec.curve = _curve(run_dir / "metrics.jsonl")
        rec.run_dir = run_dir
        rec.started = (run_dir / "last.pt").exists()
        records.append(rec)
    return study, records


def _curve(path: Path) -> list[tuple[int, float]]:
    out = []
    try:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "test.top1" in rec:
                out.append((int(rec["epoch"]) + 1, float(rec["test.top1"])))
    except (OSError, json.JSONDecodeError):
        pass
    return out


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = mean_std_of(values)
    return f"{m:.2f} ± {s:.2f}"


def _pub(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "–"
    m, s = value
    return f"{m:.2f}" + (f" ± {s:.2f}" if s is not None else "")


def summarise(study: Study, records: list[RunRecord]) -> list[dict[str, Any]]:
    """One entry per (pair, row, grid point): statistics over seeds, published value, deltas."""
    rows = []
    vanilla_rows = [r for r in study.spec.methods if study.row_method(r) == "vanilla"]
    for pair in study.pair_labels():
        mine = [r for r in records if r.kind == "student" and pair in r.pairs]
        base = [r.value("top1") for r in mine if r.ok and vanilla_rows and r.row == vanilla_rows[0]]
        base_mean = mean_std_of(base)[0] if base else None
        for row in study.spec.methods:
            for point in study.grid_points(row):
                runs = [r for r in mine if r.row == row and r.point == point]
                ok = [r for r in runs if r.ok]
                last = [r.value("top1") for r in ok]
                entry: dict[str, Any] = {
                    "pair": pair,
                    "row": row,
                    "method": study.row_method(row),
                    "point": point,
                    "planned": len(runs),
                    "finished": len(ok),
                    # near chance, diverged, failed, interrupted: counted, left out of the means
                    "excluded": count_outcomes([o for r in runs if (o := r.outcome) != "missing"]),
                    "last": mean_std_of(last) if last else None,
                    "best": mean_std_of([r.value("best") for r in ok]) if ok else None,
                    "last_values": last,
                    "seconds_per_run": mean_std_of([r.summary["wall_time_s"] for r in ok])[0] if ok else None,
                    "published": study.published(pair, row),
                    "latency_ms": (ok[0].summary.get("student_cpu_latency_ms") if ok else None),
                    "student": runs[0].student if runs else None,
                }
                if last and base_mean is not None:
                    entry["gain_vs_vanilla"] = mean_std_of(last)[0] - base_mean
                probes = sorted({k for r in ok for k in (r.summary or {}).get("probes", {})})
                entry["probes"] = {
                    k: mean_std_of([v for r in ok if (v := r.value(k)) is not None]) for k in probes
                }
                rows.append(entry)
    return rows


def teacher_accuracy(study: Study, records: list[RunRecord], pair: str) -> float | None:
    """The teacher's test top-1: from its training run in the sweep, or as measured by the student runs."""
    label_to_teacher = {study.pair_label(p): p.teacher for p in study.spec.pairs}
    name = label_to_teacher[pair]
    for r in records:
        if r.kind == "teacher" and r.row == name and r.ok:
            return r.value("top1")
    seen = [
        v
        for r in records
        if pair in r.pairs and r.summary and (v := r.summary.get("teacher_test_top1")) is not None
    ]
    return seen[0] if seen else None


def format_markdown(study: Study, records: list[RunRecord], entries: list[dict], compare: bool) -> str:
    spec = study.spec
    n_done = sum(1 for r in records if r.kind == "student" and r.ok)
    n_all = sum(1 for r in records if r.kind == "student")
    out = [f"# {study.name}", "", spec.description, ""]
    out.append(
        f"{n_done} of {n_all} student runs finished. **last** = test top-1 (%) at the last epoch (what the "
        "papers report); **best** = at the best test epoch (selected on the test set: optimistic). Mean ± "
        "sample std over seeds; runs that ended near chance, diverged (a non-finite loss), failed or were "
        "interrupted are left out of the means and counted."
    )
    if compare and spec.published_source:
        out.append(f"Published numbers: {spec.published_source}; Δ = our last-epoch mean − published.")
    out.append("")
    for pair in study.pair_labels():
        mine = [e for e in entries if e["pair"] == pair]
        t_acc = teacher_accuracy(study, records, pair)
        out.append(f"## {pair}")
        out.append("")
        head = ["method", "last top-1", "best top-1", "gain vs vanilla"]
        head += ["published", "Δ"] if compare else []
        head += ["runs", "s/run"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        t_pub = study.published(pair, "teacher").get("top1")
        cells = ["teacher", f"{t_acc:.2f}" if t_acc is not None else "–", "", ""]
        if compare:
            cells += [_pub(t_pub), f"{t_acc - t_pub[0]:+.2f}" if t_acc is not None and t_pub else ""]
        out.append("| " + " | ".join(cells + ["", ""]) + " |")
        for e in mine:
            name = e["row"] + (f" [{point_label(e['point'])}]" if e["point"] else "")
            last = _cell(e["last_values"])
            best = f"{e['best'][0]:.2f} ± {e['best'][1]:.2f}" if e["best"] else "–"
            gain = f"{e['gain_vs_vanilla']:+.2f}" if "gain_vs_vanilla" in e else ""
            cells = [name, last, best, gain]
            if compare:
                pub = e["published"].get("top1")
                delta = f"{e['last'][0] - pub[0]:+.2f}" if pub and e["last"] else ""
                cells += [_pub(pub), delta]
            excluded = describe_counts(e["excluded"])
            runs = f"{e['finished']}/{e['planned']}" + (f" ({excluded})" if excluded else "")
            cells += [runs, f"{e['seconds_per_run']:.0f}" if e["seconds_per_run"] else ""]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        probe_keys = sorted({k for e in mine for k in e["probes"]} | _published_probes(study, pair))
        if probe_keys:
            out += [f"Linear-probe transfer of the {pair} students (frozen features): test top-1 (%)", ""]
            head = ["method"] + [k.removeprefix("probe.") for k in probe_keys]
            if compare:
                head += [f"published {k.removeprefix('probe.')}" for k in probe_keys]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for e in mine:
                cells = [e["row"]]
                for k in probe_keys:
                    v = e["probes"].get(k)
                    cells.append(f"{v[0]:.2f} ± {v[1]:.2f}" if v else "–")
                if compare:
                    cells += [_pub(e["published"].get(k)) for k in probe_keys]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def _published_probes(study: Study, pair: str) -> set[str]:
    rows = study.spec.published.get(pair, {})
    return {k for v in rows.values() if isinstance(v, dict) for k in v if k.startswith("probe.")}


def report(
    study_dir: str | Path,
    *,
    compare_published: bool = False,
    out: str | Path | None = None,
    plots: bool = True,
    measure_latency: bool = True,
) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs into ``out`` (default: the study directory)."""
    study, records = collect(study_dir)
    entries = summarise(study, records)
    dest = Path(out) if out is not None else Path(study_dir)
    dest.mkdir(parents=True, exist_ok=True)
    text = format_markdown(study, records, entries, compare_published)
    pictures = []
    if plots:
        from . import plots as P

        pictures += P.training_curves(study, records, dest)
        pictures += P.term_gradient_plots(study, records, dest)
        pictures += P.ablation_contours(study, entries, dest)
        lat = _latencies(study, records, Path(study_dir)) if measure_latency else {}
        pictures += P.accuracy_vs_latency(study, entries, lat, dest)
    if pictures:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pictures) + "\n"
    _write(dest / "report.md", text)
    payload = {
        "study": study.name,
        "description": study.spec.description,
        "published_source": study.spec.published_source,
        "entries": [{k: v for k, v in e.items()} for e in entries],
        "teachers": {p: teacher_accuracy(study, records, p) for p in study.pair_labels()},
    }
    _write(dest / "report.json", json.dumps(payload, indent=1, default=str) + "\n")
    return dest / "report.md"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _latencies(study: Study, records: list[RunRecord], study_dir: Path) -> dict[str, dict[str, float]]:
    """Median batch-1 CPU latency (ms; 1 thread and all threads) of every student architecture, measured
    here on an untrained copy (latency does not depend on the weights) and cached in ``latency.json``."""
    from mimkd.evaluation.latency import latency_profile
    from mimkd.models.resolve import build_network

    cache_path = study_dir / "latency.json"
    cache = _read_json(cache_path) or {}
    changed = False
    for r in records:
        s = r.summary or {}
        shape = s.get("student_input_shape")
        if r.kind != "student" or not r.ok or not shape:
            continue
        key = f"{r.student}@{'x'.join(map(str, shape))}"
        if key in cache:
            continue
        ck_classes = s.get("num_classes") or 10
        net = build_network(r.student, int(ck_classes), int(shape[0]))
        prof = latency_profile(net, tuple(shape), runs=100)
        cache[key] = {k: v["median_ms"] for k, v in prof.items()}
        changed = True
    if changed:
        _write(cache_path, json.dumps(cache, indent=1) + "\n")
    return {k.split("@")[0]: v for k, v in cache.items()}
