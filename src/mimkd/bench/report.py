"""The ``mimkd bench`` command and its report: method and option resolution, derived columns (ratio to KD,
achieved FLOP/s, share of the matmul ceiling, projected wall time), the markdown table and the JSON file.

The measurement itself is :mod:`mimkd.bench.timing`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mimkd.errors import ConfigError

__all__ = [
    "resolve_methods",
    "method_options",
    "parse_input_shape",
    "derive",
    "format_markdown",
    "write_report",
]


def resolve_methods(text: str) -> list[str]:
    """``"kd,crd,mimkd"`` or ``"all"`` -> method names; an unknown name raises a MethodError listing the
    registered ones."""
    from mimkd.distillers import available, get_method, validate_options

    names = [m.strip() for m in text.split(",") if m.strip()]
    if names == ["all"]:  # the registry's display order; vanilla is the student-step row
        return [m for m in available(ordered=True) if m != "vanilla"]
    for m in names:
        method, options = split_row(m)
        get_method(method)  # MethodError: "unknown method 'x'. Did you mean ...? Valid methods: ..."
        validate_options(method, options)
    return list(dict.fromkeys(names))


def split_row(row: str) -> tuple[str, dict[str, Any]]:
    """A row ``NAME`` or ``NAME:KEY=V[:KEY=V...]`` (one method with its own options, e.g.
    ``mimkd:critic_locations=16`` beside ``mimkd``) -> ``(NAME, {KEY: V})``."""
    from mimkd.config import parse_override

    method, *parts = row.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        path, value = parse_override(f"method.{part}")
        if len(path) != 2:
            raise ConfigError(f"--methods {row!r}: expected NAME:KEY=VALUE, got {part!r}")
        options[path[1]] = value
    return method, options


def method_options(overrides: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--set`` overrides -> options per method. ``method.KEY=V`` goes to every benchmarked method whose
    options have ``KEY``; ``NAME.KEY=V`` (e.g. ``mimkd.critic_width=32``) to method ``NAME`` only."""
    from mimkd.config import parse_override
    from mimkd.distillers import available, get_method, validate_options

    out: dict[str, dict[str, Any]] = {}
    targets = ["vanilla", *(split_row(m)[0] for m in methods)]
    for text in overrides:
        path, value = parse_override(text)
        if len(path) < 2:
            raise ConfigError(f"--set {text!r}: expected method.KEY=VALUE or METHOD.KEY=VALUE")
        head, key = path[0], path[1]
        if head == "method":
            chosen = [m for m in targets if key in get_method(m).Options.model_fields]
            if not chosen:
                raise ConfigError(f"--set {text!r}: no benchmarked method ({', '.join(methods)}) has {key!r}")
        elif head in available():
            if head not in targets:
                raise ConfigError(f"--set {text!r}: method {head!r} is not benchmarked (--methods)")
            chosen = [head]
        else:
            raise ConfigError(f"--set {text!r}: the key must start with 'method.' or a method name")
        for m in chosen:
            node = out.setdefault(m, {})
            for part in path[1:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    for m, opts in out.items():
        validate_options(m, opts)
    return out


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"3x32x32"`` -> (3, 32, 32)."""
    try:
        shape = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape {text!r}: expected CxHxW with positive sizes, e.g. 3x32x32")
    return shape  # type: ignore[return-value]


def derive(report: dict[str, Any], epochs: int = 240, images: int = 50000) -> dict[str, Any]:
    """Add to every measured row: time per image vs KD, achieved GFLOP/s, % of the matmul ceiling (the one
    measured in the row's process just before its timing, else the header's) and the projected wall time of
    ``epochs`` epochs of ``images`` images (minutes)."""
    ceiling = report["header"]["matmul_ceiling"]["gflops"]
    report["projection"] = {"epochs": epochs, "images_per_epoch": images}
    kd = next((r for r in report["rows"] if r.get("row") == "kd" and "error" not in r), None)
    for r in report["rows"]:
        if "error" in r:
            continue
        r["vs_kd"] = kd["images_per_s"] / r["images_per_s"] if kd else None
        r["gflops_per_s"] = r["flops_per_image"] * r["images_per_s"] / 1e9
        r["pct_of_ceiling"] = 100.0 * r["gflops_per_s"] / r.get("row_ceiling_gflops", ceiling)
        r["projected_minutes"] = epochs * images / r["images_per_s"] / 60.0
    return report


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _openmp_text(header: dict[str, Any]) -> str:
    """The OpenMP wait settings of the run (absent from tables written before they were recorded)."""
    if "openmp" not in header:
        return ""
    omp = ", ".join(f"{k}={v}" for k, v in header["openmp"].items())
    return f", OpenMP {omp or 'wait policy: libgomp default'}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown document (title, conditions, table, notes)."""
    s, h, proj = report["setup"], report["header"], report["projection"]
    c, ceil = s["input_shape"], h["matmul_ceiling"]
    cuda = s["device"].startswith("cuda")
    load = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
    opts = ", ".join(f"{m}.{k}={v}" for m, o in s["options"].items() for k, v in o.items()) or "defaults"
    batch = "largest batch that fits (per row)" if report["max_batch"] else f"batch {s['batch_size']}"
    mem = "peak allocated MiB" if cuda else "peak RSS MiB"
    layout = "channels_last" if s["channels_last"] else "NCHW"
    loads = [h["load_avg_start"][0], h["load_avg_end"][0], *(r.get("load_1min", 0) for r in report["rows"])]
    peak_load = max(loads)
    busy = (
        f" **Busy machine: the 1-minute load reached {peak_load:.1f} on {h['cpu_count']} CPUs, so other jobs "
        "shared the cores; rates are below this machine's and ratios between rows carry that noise. "
        "Regenerate on an idle machine for reference numbers.**"
        if not cuda and h.get("cpu_count") and peak_load > h["cpu_count"] + 0.5
        else ""
    )
    plural = "s" if h["threads"] != 1 else ""
    n_rounds = h.get("rounds", 1)
    rounds_text = (
        f"; every row measured in {n_rounds} rounds (round-robin), the fastest round reported"
        if n_rounds > 1
        else ""
    )
    row_ceils = [r["row_ceiling_gflops"] for r in report["rows"] if "row_ceiling_gflops" in r]
    lo, hi = (min(row_ceils), max(row_ceils)) if row_ceils else (0.0, 0.0)
    lines = [
        f"# mimkd bench: {s['teacher']} → {s['student']}, {batch}, {s['device']}",
        "",
        f"Input {c[0]}×{c[1]}×{c[2]} (synthetic, on the device), {s['num_classes']} classes, training-set "
        f"size N = {s['num_train']:,} (memory banks, labels); {layout}; "
        f"{s.get('precision', 'fp32')}{', torch.compile' if s.get('compile') else ''}. "
        f"torch {h['torch']}, {h['device_name']}, {h['threads']} thread{plural} of {h['cpu_count']} CPUs, "
        f"allocator {h['allocator']}{_openmp_text(h)}. Median over up to {s['steps']} timed steps after "
        f"{s['warmup']} warm-up steps per row{rounds_text}. Method options: {opts}.",
        "",
        f"Load average (1/5/15 min): {load(h['load_avg_start'])} at start, {load(h['load_avg_end'])} at end "
        "(other jobs on this machine slow every row alike only if the load stays steady)." + busy,
        "",
        f"Matmul ceiling: {ceil['n']}×{ceil['n']} {ceil['dtype']} matmul, **{ceil['gflops']:.1f} GFLOP/s** "
        "at start"
        + (f" (allow_tf32={ceil['allow_tf32']})" if "allow_tf32" in ceil else "")
        + (
            f"; measured again in each row's process right after its timing: {lo:.1f} - {hi:.1f} GFLOP/s, "
            "the `% of ceiling` of a row uses its own"
            if row_ceils
            else ""
        )
        + ". FLOPs: torch FlopCounterMode over one step (forward + backward), per image.",
        "",
        f"| row | batch | img/s (median) | img/s IQR (best) | ms / step | time vs kd | {mem} "
        + ("" if cuda else "| RSS before build ")
        + "| trainable params | method params | GFLOPs / img | GFLOP/s | % of ceiling "
        + f"| {proj['epochs']}-epoch min |",
        "|" + "---|" * (13 if cuda else 14),
    ]
    notes, errors = [], []
    for r in report["rows"]:
        if "error" in r:
            errors.append(f"- {r['row']}: {r['error']}")
            continue
        cells = [
            r["row"],
            str(r["batch"]),
            f"{r['images_per_s']:.1f}",
            f"{r['images_per_s_q1']:.1f} - {r['images_per_s_q3']:.1f}"
            + (f" ({r['images_per_s_max']:.1f})" if "images_per_s_max" in r else ""),
            f"{r['ms_per_step']:.1f}",
            _num(r.get("vs_kd"), ".2f") + ("x" if r.get("vs_kd") is not None else ""),
            _num(r["peak_mem_mib"], ".0f"),
            *([] if cuda else [_num(r.get("base_rss_mib"), ".0f")]),
            f"{r['params']:,}" + (" (frozen)" if r["row"] == "teacher forward" else ""),
            f"{r['method_params']:,}",
            f"{r['flops_per_image'] / 1e9:.3f}",
            f"{r['gflops_per_s']:.1f}",
            f"{r['pct_of_ceiling']:.1f}",
            f"{r['projected_minutes']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if r.get("init_stages"):
            stages = ", ".join(f"{n} ({e} epochs)" for n, e in r["init_stages"])
            notes.append(f"- {r['row']}: init stage(s) {stages} run before the main stage; not timed.")
    lines += [
        "",
        f"Rows: `student step` = the vanilla distiller's training step (CE); `teacher forward` = inference "
        "mode; a method row = its main-stage training step (forward, summed terms, backward, SGD step). "
        "`best` = the fastest timed step (the least disturbed on a shared machine). "
        "`time vs kd` = time per image relative to kd (medians). `method params` = trainable parameters "
        f"besides the student's. `{proj['epochs']}-epoch min` = {proj['epochs']} × "
        f"{proj['images_per_epoch']:,} images / img/s, minutes (compute only: no loader, evaluation or "
        "checkpoints).",
    ]
    if not cuda:
        lines.append(
            "Memory: peak RSS of a fresh process that ran only that row; `RSS before build` is the same "
            "process after importing torch and mimkd, so the row's own memory is the difference."
            if report["isolated"]
            else "Memory: not measured (rows ran in one process; use the default isolation on CPU)."
        )
    if notes:
        lines += ["", *notes]
    if errors:
        lines += ["", "Not measured:", "", *errors]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``OUT.md`` and ``OUT.json``; returns their paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = Path(f"{out}.md"), Path(f"{out}.json")
    md.write_text(format_markdown(report))
    js.write_text(json.dumps(report, indent=2) + "\n")
    return md, js
