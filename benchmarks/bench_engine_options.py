"""Images/s of the trainer's training step on this CPU under each engine option, one option changed at a time.

    python benchmarks/bench_engine_options.py [--cases demo_kd,demo_mimkd,resnet_kd] [--rounds 5] [--steps 3]

The step is :class:`mimkd.engine.step.TrainStep` (exactly the trainer's: forward, loss sum, non-finite check,
backward, SGD step). Baseline: fp32, channels_last, 2 threads, eager, non-finite check read each step. Each
variant changes one thing: ``contiguous`` (NCHW), ``threads1``, ``bf16`` (autocast), ``compile``
(:func:`mimkd.engine.step.compile_distiller`, the first steps' compile time reported apart), ``deferred``
(the device-side non-finite check with fused SGD). Variants of a case are timed interleaved, round by round,
so that the load of a shared machine falls on all of them alike; the 1-minute load average is recorded
around every case (the development machine is shared with other jobs). Also the teacher's forward under
``torch.no_grad`` vs ``torch.inference_mode``.

``--accuracy`` (a separate invocation; it adds its section to the existing results): bf16 against fp32 on the
same seeds, real training runs of the demo pair with kd through the CLI (Fashion-MNIST, the cached demo
teacher), final test top-1 per seed.

Cases: the demo pair (cnn_teacher -> conv4mp_w32, 1x28x28, kd and mimkd with critic_width 32, N = 60,000),
resnet32x4 -> resnet8x4 (3x32x32, kd, 100 classes); batch 64; random inputs (speed does not depend on pixel
values). Writes ``results/engine_options_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mimkd.allocator import reexec_with_tcmalloc  # noqa: E402

if __name__ == "__main__":
    # as `python -m mimkd` does (src/mimkd/__main__.py); --omp-wait-policy ACTIVE/PASSIVE/default (libgomp's
    # own policy: spin a while, then sleep) measures the others
    for k, arg in enumerate(sys.argv):
        if arg == "--omp-wait-policy" and k + 1 < len(sys.argv):
            if sys.argv[k + 1] == "default":
                os.environ.pop("OMP_WAIT_POLICY", None)
                break
            os.environ["OMP_WAIT_POLICY"] = sys.argv[k + 1]
    else:
        if "GOMP_SPINCOUNT" not in os.environ:
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    reexec_with_tcmalloc([str(Path(__file__).resolve()), *sys.argv[1:]])

import torch  # noqa: E402

from mimkd.config import OptimConfig  # noqa: E402
from mimkd.distillers import build_distiller  # noqa: E402
from mimkd.engine.recipe import build_optimizer  # noqa: E402
from mimkd.engine.step import TrainStep, compile_distiller  # noqa: E402
from mimkd.models import build_network  # noqa: E402


@dataclass
class Case:
    name: str
    teacher: str
    student: str
    method: str
    shape: tuple[int, int, int]
    classes: int
    n_train: int
    options: dict = field(default_factory=dict)
    variants: tuple[str, ...] = ("baseline", "contiguous", "threads1", "bf16", "compile", "deferred")


CASES = {
    "demo_kd": Case("demo_kd", "cnn_teacher", "conv4mp_w32", "kd", (1, 28, 28), 10, 60000),
    "demo_mimkd": Case(
        "demo_mimkd", "cnn_teacher", "conv4mp_w32", "mimkd", (1, 28, 28), 10, 60000, {"critic_width": 32}
    ),
    "resnet_kd": Case(
        "resnet_kd",
        "resnet32x4",
        "resnet8x4",
        "kd",
        (3, 32, 32),
        100,
        50000,
        variants=("baseline", "contiguous", "threads1", "bf16", "deferred"),
    ),  # fmt: skip
}

VARIANTS = {
    "baseline": {},
    "contiguous": {"channels_last": False},
    "threads1": {"threads": 1},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "deferred": {"check": "deferred"},
}


def settings(variant: str) -> dict:
    base = {"channels_last": True, "threads": 2, "precision": "fp32", "compile": False, "check": "step"}
    return base | VARIANTS[variant]


def build(case: Case, s: dict, batch: int):
    """(step, batches) for one variant: a fresh distiller (same seed), its optimiser and TrainStep."""
    torch.manual_seed(0)
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    c = case.shape[0]
    student, teacher = (
        build_network(case.student, case.classes, c),
        build_network(case.teacher, case.classes, c),
    )
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, case.classes, (case.n_train,), generator=g)
    sample = torch.randn(8, *case.shape, generator=g)
    d = build_distiller(
        case.method, student, teacher, sample, num_classes=case.classes, train_labels=labels, **case.options
    )
    d = d.to(memory_format=fmt).train()
    if s["compile"]:
        compile_distiller(d)
    opt = build_optimizer(
        OptimConfig(optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4),
        [p for _, p in d.trainable_named_parameters()],
        fused=s["check"] == "deferred",
    )
    step = TrainStep(d, opt, precision=s["precision"], check=s["check"])
    batches = []
    for _ in range(4):
        x = torch.randn(batch, *case.shape, generator=g).contiguous(memory_format=fmt)
        idx = torch.randperm(case.n_train, generator=g)[:batch]
        batches.append((x, labels[idx], idx))
    return step, batches


def teacher_forward(case: Case, batch: int, rounds: int) -> dict:
    """Median ms of the teacher's forward under no_grad and inference_mode (interleaved)."""
    torch.set_num_threads(2)
    net = (
        build_network(case.teacher, case.classes, case.shape[0]).eval().to(memory_format=torch.channels_last)
    )
    x = torch.randn(batch, *case.shape).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"no_grad": [], "inference_mode": []}
    for r in range(rounds + 1):
        for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            t0 = time.perf_counter()
            with ctx():
                net(x)
            if r:  # the first round warms up
                times[mode].append(time.perf_counter() - t0)
    return {m: {"median_ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v)} for m, v in times.items()}


def run_case(case: Case, batch: int, rounds: int, steps: int, variants: list[str]) -> dict:
    load_before = os.getloadavg()
    built, compile_s = {}, {}
    for v in variants:
        s = settings(v)
        torch.set_num_threads(s["threads"])
        step, batches = build(case, s, batch)
        t0 = time.perf_counter()
        for x, y, i in batches[:2]:  # warm-up (and compilation)
            step(x, y, i)
        compile_s[v] = time.perf_counter() - t0
        built[v] = (step, batches, s)
        print(f"  {case.name}/{v}: built, warm-up {compile_s[v]:.1f} s", flush=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            step, batches, s = built[v]
            torch.set_num_threads(s["threads"])
            for k in range(steps):
                x, y, i = batches[k % len(batches)]
                t0 = time.perf_counter()
                step(x, y, i)
                times[v].append(time.perf_counter() - t0)
        print(f"  {case.name}: round {r + 1}/{rounds}, load {os.getloadavg()[0]:.2f}", flush=True)
    load_after = os.getloadavg()
    rows = []
    for v in variants:
        t = times[v]
        med = statistics.median(t)
        rows.append(
            {
                "case": case.name,
                "variant": v,
                "settings": built[v][2],
                "steps_timed": len(t),
                "ms_per_step_median": 1000 * med,
                "ms_per_step_min": 1000 * min(t),
                "img_per_s_median": batch / med,
                "img_per_s_best": batch / min(t),
                "warmup_s": compile_s[v],
            }
        )
    base = next(r for r in rows if r["variant"] == "baseline")
    for r in rows:
        r["speed_vs_baseline"] = base["ms_per_step_median"] / r["ms_per_step_median"]
    return {
        "case": case.name,
        "pair": f"{case.teacher} -> {case.student}",
        "method": case.method,
        "options": case.options,
        "input": list(case.shape),
        "batch": batch,
        "load_before": load_before,
        "load_after": load_after,
        "rows": rows,
        "teacher_forward": teacher_forward(case, batch, max(3, rounds)),
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Engine options on a CPU: images/s of the trainer's training step",
        "",
        f"Measured by `benchmarks/bench_engine_options.py` on {m['cpu']} ({m['cores']} cores), torch "
        f"{m['torch']}, allocator {m['allocator']}, OMP_WAIT_POLICY "
        f"{m.get('omp_wait_policy')}, batch {res['batch']}. Each variant "
        "changes one setting of the baseline (fp32, channels_last, 2 threads, eager, non-finite flag read "
        "each step); "
        f"variants interleaved over {res['rounds']} rounds x {res['steps']} steps; median and best step. "
        "Load: the 1-minute load average before / after the case (2 = both cores busy).",
        "",
    ]
    for c in res["cases"]:
        lb, la = c["load_before"][0], c["load_after"][0]
        lines += [
            f"## {c['case']}: {c['pair']}, {c['method']} {c['options'] or ''}, input {c['input']}",
            "",
            f"load {lb:.2f} -> {la:.2f}",
            "",
            "| variant | img/s (median) | img/s (best) | ms/step (median) | vs baseline | warm-up s |",
            "|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['variant']} | {r['img_per_s_median']:.0f} | {r['img_per_s_best']:.0f} | "
                f"{r['ms_per_step_median']:.0f} | {r['speed_vs_baseline']:.2f}x | {r['warmup_s']:.1f} |"
            )
        tf = c["teacher_forward"]
        lines += [
            "",
            f"Teacher forward ({c['pair'].split(' ')[0]}): no_grad {tf['no_grad']['median_ms']:.1f} ms "
            f"(best {tf['no_grad']['min_ms']:.1f}), inference_mode "
            f"{tf['inference_mode']['median_ms']:.1f} ms (best {tf['inference_mode']['min_ms']:.1f}).",
            "",
        ]
    if "wait_policy" in res:
        lines += wait_policy_markdown(res["wait_policy"])
    if "accuracy" in res:
        lines += accuracy_markdown(res["accuracy"])
    lines += ["## Defaults chosen", ""] + [f"- {line}" for line in res["decisions"]]
    return "\n".join(lines) + "\n"


DECISIONS = [
    "`OMP_WAIT_POLICY=PASSIVE`, set by the `mimkd` command when the environment sets neither "
    "`OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT`: a robustness choice, measured in the wait-policy table. On the "
    "idle machine libgomp's default (spin 3 ms, then sleep) is faster at 2 threads: demo kd 1.47x, resnet "
    "pair 1.1x over PASSIVE. With one other busy process on the 2 cores it is slower: demo kd 2.7x, resnet "
    "pair 1.3x below PASSIVE (whose 2-thread step then equals the 1-thread step; an earlier grid under a "
    "load average of 5 saw spinning 2-thread steps 10-16x slower than 1 thread). PASSIVE has the best worst "
    "case (0.68 of the best setting; default 0.37, spin 10k 0.48, ACTIVE 0.74) and the best geometric mean "
    "over the four situations. Research machines running many seeds side by side are the shared case; on "
    "an idle machine `GOMP_SPINCOUNT=300000` restores libgomp's default.",
    "`train.channels_last=true` (unchanged default): NHWC was faster or equal (demo kd 1.57x, resnet pair "
    "1.18x; demo mimkd 0.93x, within its noise).",
    "`train.precision=fp32` on a CPU: this CPU has AVX2 but no bf16 arithmetic (no AVX512-BF16/AMX); bf16 "
    "autocast was 6-14x slower (0.16x, 0.07x, 0.11x). Accuracy did not drop: bf16 minus fp32 top-1 was "
    "-0.69, +0.93 and -0.35 on three seeds (mean -0.04; the fp32 seeds themselves span 0.94), i.e. within "
    "noise (kd's loss is computed in float32 under autocast, as CUDA's autocast policy would; before that "
    "change the bf16 KD term was off by up to 30%).",
    "`train.compile=false`: it works here (gcc present; same losses) but was not faster: demo kd 0.76x, and "
    "for MIMKD nothing is compiled in practice (its networks carry feature taps and stay eager, its critics "
    "are called through methods other than forward), so its 1.15x row is this machine's noise (mimkd rows "
    "vary by about +-30% between rounds). A cold compile of the demo kd pair took about 90 s before the "
    "first step (the warm-up column shows a warm cache).",
    "`threads`: left to torch (all cores): 2 threads beat 1 on the resnet pair (1.54x); on the tiny demo "
    "student 1 thread is as fast (1.02x kd, 1.35x mimkd), which is why the demo and sweeps run one thread "
    "per run and as many runs as cores; `--threads` sets it.",
    "`train.nonfinite_check=auto`: `step` on a CPU (deferred was within noise: 0.82x, 1.20x, 1.03x, so the "
    "simpler semantics stay), `deferred` on CUDA, where reading the flag would stall the device queue.",
    "teacher: stays under `torch.no_grad`: inference_mode measured the same (26.9 vs 24.1 ms, 14.6 vs "
    "16.3 ms, 1202 vs 1221 ms: noise), and several methods feed teacher features to layers that save them "
    "for the backward, which inference tensors refuse.",
]


#: OpenMP settings compared by ``--wait-policy``: libgomp's default spins up to GOMP_SPINCOUNT (300,000)
#: iterations before sleeping, ACTIVE spins forever, PASSIVE sleeps at once.
WAIT_POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
}


def _busy_process() -> subprocess.Popen:
    """Another job on the machine: one process keeping one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def wait_policies(rounds: int, steps: int, cases: list[str]) -> dict:
    """The baseline (2 threads) and threads1 of each case under each OpenMP setting of ``WAIT_POLICIES``, each
    in its own process (the settings are read when the OpenMP runtime loads), on the idle machine and with one
    competing busy process; every setting twice, interleaved."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case_name in cases:
            for load in ("idle", "1 busy process"):
                for repeat in range(2):
                    for policy, extra in WAIT_POLICIES.items():
                        base = Path(tmp) / f"{case_name}_{repeat}_{len(rows)}"
                        cmd = [
                            sys.executable, str(Path(__file__).resolve()), "--cases", case_name, "--variants",
                            "baseline,threads1", "--rounds", str(rounds), "--steps", str(steps), "--out",
                            str(base), "--omp-wait-policy", extra.get("OMP_WAIT_POLICY", "default"),
                        ]  # fmt: skip
                        env = {
                            k: v
                            for k, v in os.environ.items()
                            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "_MIMKD_REEXEC", "LD_PRELOAD")
                        }
                        env.update(extra)
                        busy = _busy_process() if load != "idle" else None
                        try:
                            subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                        finally:
                            if busy is not None:
                                busy.kill()
                                busy.wait()
                        case = json.loads(base.with_suffix(".json").read_text())["cases"][0]
                        for r in case["rows"]:
                            rows.append(
                                {
                                    "case": case_name,
                                    "load": load,
                                    "policy": policy,
                                    "threads": r["settings"]["threads"],
                                    "img_per_s_median": r["img_per_s_median"],
                                    "ms_per_step_median": r["ms_per_step_median"],
                                    "load_avg": case["load_before"][0],
                                }
                            )
                        print(f"  {case_name} / {load} / {policy}: done", flush=True)
    return {"cases": cases, "rounds": rounds, "steps": steps, "rows": rows}


def wait_policy_markdown(wp: dict) -> list[str]:
    if "cases" not in wp:  # the first, smaller comparison (ACTIVE vs PASSIVE on demo_kd)
        return []
    policies = list(WAIT_POLICIES)
    lines = [
        "## OpenMP wait policy",
        "",
        "Median img/s of the baseline step (2 threads; 1 thread in brackets), each setting in its own "
        "process, twice, interleaved (the two values), on the idle machine and with one other process "
        "keeping a core busy (a shared machine). `default` = libgomp's own (spin up to 300,000 "
        "iterations, then sleep), `ACTIVE` = spin forever, `PASSIVE` = sleep at once, `spin 10k` = "
        "`GOMP_SPINCOUNT=10000`.",
        "",
        "| case | machine | " + " | ".join(policies) + " |",
        "|---|---|" + "---|" * len(policies),
    ]
    for case in wp["cases"]:
        for load in ("idle", "1 busy process"):
            cells = []
            for policy in policies:
                sel = [r for r in wp["rows"] if (r["case"], r["load"], r["policy"]) == (case, load, policy)]
                two = [f"{r['img_per_s_median']:.0f}" for r in sel if r["threads"] == 2]
                one = [f"{r['img_per_s_median']:.0f}" for r in sel if r["threads"] == 1]
                cells.append(f"{' / '.join(two)} ({' / '.join(one)})")
            lines.append(f"| {case} | {load} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def accuracy_runs(teacher: str, seeds: list[int], fraction: float, epochs: int, out: Path) -> dict:
    """Final test top-1 of kd demo-pair runs, fp32 and bf16 on the same seeds (the real CLI)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for precision in ("fp32", "bf16"):
                name = f"{precision}_s{seed}"
                cmd = [
                    sys.executable, "-m", "mimkd", "distill", "--teacher", teacher,
                    "--student", "conv4mp_w32", "--method", "kd", "--data", "fashion_mnist",
                    "--train-fraction", str(fraction), "--epochs", str(epochs), "--seed", str(seed),
                    "--no-progress", "--out", tmp, "--name", name,
                    "--set", f"train.precision={precision}", "--set", "train.measure_latency=false",
                    "--set", "train.eval_teacher=false",
                ]  # fmt: skip
                t0 = time.time()
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                summary = json.loads((Path(tmp) / name / "summary.json").read_text())
                rows.append(
                    {
                        "seed": seed,
                        "precision": precision,
                        "top1": summary["last"]["top1"],
                        "seconds": time.time() - t0,
                        "images_per_s": summary["images_per_s"],
                        "load": os.getloadavg()[0],
                    }
                )
                print(f"  accuracy {name}: top-1 {rows[-1]['top1']:.2f}", flush=True)
    return {"teacher": teacher, "fraction": fraction, "epochs": epochs, "rows": rows}


def accuracy_markdown(acc: dict) -> list[str]:
    lines = [
        "## bf16 vs fp32 accuracy (same seeds)",
        "",
        f"kd, cnn_teacher (the cached demo teacher) -> conv4mp_w32, {acc['fraction']:.0%} of Fashion-MNIST, "
        f"{acc['epochs']} epochs, full test set; the real CLI with `--set train.precision=...`.",
        "",
        "| seed | fp32 top-1 | bf16 top-1 | difference | fp32 img/s | bf16 img/s |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["seed"], r["precision"]): r for r in acc["rows"]}
    for seed in sorted({r["seed"] for r in acc["rows"]}):
        a, b = by[(seed, "fp32")], by[(seed, "bf16")]
        lines.append(
            f"| {seed} | {a['top1']:.2f} | {b['top1']:.2f} | {b['top1'] - a['top1']:+.2f} | "
            f"{a['images_per_s']:.0f} | {b['images_per_s']:.0f} |"
        )
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default=None, help="comma list (default: each case's own)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "engine_options_cpu"))
    ap.add_argument(
        "--omp-wait-policy", default=None, help="PASSIVE (as mimkd, the default here), ACTIVE or default"
    )
    ap.add_argument(
        "--wait-policy", action="store_true", help="compare OpenMP wait policies instead (adds its section)"
    )
    ap.add_argument("--accuracy", action="store_true", help="run the bf16 vs fp32 training runs instead")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    ap.add_argument("--teacher", default=None, help="demo teacher checkpoint (default: the demo's cache)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    out = Path(a.out)
    if a.render:  # rewrite the markdown from the JSON with the current decisions
        res = json.loads(out.with_suffix(".json").read_text())
        res["decisions"] = DECISIONS
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
        return
    if a.wait_policy:
        res = json.loads(out.with_suffix(".json").read_text())
        res["wait_policy"] = wait_policies(a.rounds, a.steps, a.cases.split(","))
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
        print(markdown(res))
        return
    if a.accuracy:
        teacher = a.teacher or str(
            next((Path.home() / ".cache" / "mimkd" / "teachers").glob("cnn_teacher_fashion_mnist_*/best.pt"))
        )
        res = json.loads(out.with_suffix(".json").read_text())
        res["accuracy"] = accuracy_runs(
            teacher, [int(x) for x in a.seeds.split(",")], a.fraction, a.epochs, out
        )
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
        print(markdown(res))
        return
    cases = []
    for name in a.cases.split(","):
        case = CASES[name]
        variants = [v for v in (a.variants.split(",") if a.variants else case.variants) if v in case.variants]
        if "baseline" not in variants:
            variants.insert(0, "baseline")
        print(f"{name}: {variants}", flush=True)
        cases.append(run_case(case, a.batch, a.rounds, a.steps, variants))
    res = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "batch": a.batch,
        "rounds": a.rounds,
        "steps": a.steps,
        "cases": cases,
        "decisions": DECISIONS,
    }
    try:
        with open("/proc/cpuinfo") as f:
            res["machine"]["cpu"] = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
