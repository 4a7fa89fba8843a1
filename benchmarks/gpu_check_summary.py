"""Summarise a ``benchmarks/gpu_check.sh`` folder into ``summary.md`` and ``summary.json``.

    python benchmarks/gpu_check_summary.py OUT [--dry-run 0|1]

Exit status 1 when any step failed (its log is named in the table).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bench_lines(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("bench_*.json")):
        report = _json(path)
        if not isinstance(report, dict):
            continue
        lines += [
            f"### {path.stem}",
            "",
            "| row | ms / step | time vs kd | img/s | 240-epoch CIFAR-100 min |",
        ]
        lines.append("|---|---|---|---|---|")
        for r in report.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['row']} | error: {str(r['error'])[:80]} | | | |")
                continue
            vs = f"{r['vs_kd']:.2f}x" if r.get("vs_kd") else ""
            minutes = f"{r['projected_minutes']:.1f}" if r.get("projected_minutes") else ""
            lines.append(
                f"| {r['row']} | {r['ms_per_step']:.1f} | {vs} | {r['images_per_s']:.0f} | {minutes} |"
            )
        lines.append("")
    return lines


def _runs(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("runs/*/summary.json")) + sorted(out.glob("torchrun/*/summary.json")):
        s = _json(path) or {}
        speed = s.get("speed", {})
        rows.append(
            {
                "run": str(path.parent.relative_to(out)),
                "status": s.get("status"),
                "test_top1": (s.get("last") or {}).get("top1"),
                "seconds": round(s["wall_time_s"], 1) if "wall_time_s" in s else None,
                "images_per_s": round(s["images_per_s"]) if s.get("images_per_s") else None,
                "data_on_device": speed.get("data_on_device"),
                "precision": speed.get("precision"),
                "world_size": speed.get("world_size"),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dry-run", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
    tests_log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
    counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tests_log)
    summary = {
        "dry_run": bool(a.dry_run),
        "env": _json(out / "env.json"),
        "steps": steps,
        "tests": {kind: int(n) for n, kind in counts},
        "bench": {p.stem: _json(p) for p in sorted(out.glob("bench_*.json"))},
        "banks": _json(out / "banks.json"),
        "runs": _runs(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    kind = "DRY RUN on the CPU (tiny settings; no GPU numbers)" if a.dry_run else "GPU"
    env = summary["env"] or {}
    lines = [
        f"# GPU check ({kind})",
        "",
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, device {env.get('gpu', 'cpu')}"
        + (f" ({env.get('memory_gib')} GiB)" if env.get("memory_gib") else ""),
        "",
        "| step | exit | seconds | log |",
        "|---|---|---|---|",
        *(f"| {s['step']} | {s['rc']} | {s['seconds']} | `{s['step']}.log` |" for s in steps),
        "",
        "CUDA-only tests (`pytest -m cuda`): "
        + (", ".join(f"{n} {k}" for k, n in summary["tests"].items()) or "no result line"),
        "",
        *_bench_lines(out),
    ]
    if (out / "banks.md").exists():
        lines += ["### memory banks", "", *(out / "banks.md").read_text().splitlines()[4:], ""]
    lines += ["### real runs (Fashion-MNIST)", ""]
    lines += ["| run | status | test top-1 | seconds | img/s | precision | data on device | world |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in summary["runs"]:
        lines.append(
            f"| {r['run']} | {r['status']} | {r['test_top1']} | {r['seconds']} | {r['images_per_s']} | "
            f"{r['precision']} | {r['data_on_device']} | {r['world_size']} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [s["step"] for s in steps if s["rc"] != 0]
    if failed:
        print(f"[gpu_check] failed steps: {', '.join(failed)} (their logs are in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
