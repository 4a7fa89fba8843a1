"""The ``mimkd`` command. Thin: it parses, validates and calls the library.

Every user error (bad key, unknown model, missing file, corrupt checkpoint) is printed as one message and
exits with status 2; nothing prints a traceback unless ``MIMKD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mimkd.errors import MimkdError, install_warning_format

__all__ = ["main", "build_parser", "entry", "set_openmp_wait_policy"]


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML run configuration; flags and --set override it")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set optim.lr=0.1 --set method.lambda_l=0.5 (repeatable)",
    )
    g.add_argument("--data", help="dataset name (mimkd datasets lists them)")
    g.add_argument("--data-root", help="dataset directory (default: the dataset's standard location)")
    g.add_argument("--train-fraction", type=float, help="stratified, seeded fraction of the training set")
    g.add_argument("--image-size", type=int, help="resize images to this size (folder datasets)")
    g.add_argument("--recipe", help="training recipe: cifar, imagenet, fashion_mnist (default: by dataset)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--out", help="directory that holds run directories (default: runs)")
    g.add_argument("--name", help="run directory name (default: METHOD_STUDENT_DATA_sSEED)")
    g.add_argument("--resume", action="store_true", help="continue the run in its directory from last.pt")
    g.add_argument("--overwrite", action="store_true", help="start the run over if its directory exists")
    g.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show the progress bar"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _flags_to_config(a: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = cfg
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    put("data.name", a.data)
    put("data.root", a.data_root)
    put("data.train_fraction", a.train_fraction)
    put("data.image_size", a.image_size)
    put("optim.recipe", a.recipe)
    put("optim.epochs", a.epochs)
    put("optim.batch_size", a.batch_size)
    put("optim.lr", a.lr)
    put("seed", a.seed)
    put("device", a.device)
    put("threads", a.threads)
    put("out_dir", a.out)
    put("name", a.name)
    put("train.progress", a.progress)
    return cfg


def cmd_train(a: argparse.Namespace) -> int:
    from mimkd.config import load_config
    from mimkd.engine.setup import run

    base = _flags_to_config(a)
    if a.model:
        base.setdefault("student", {})["arch"] = a.model
    base.setdefault("method", {}).setdefault("name", "vanilla")
    cfg = load_config(a.config, a.overrides, base)
    if cfg.method.name != "vanilla" or cfg.teacher is not None:
        raise MimkdError("mimkd train trains one network without a teacher; use mimkd distill for methods")
    _print_summary(run(cfg, resume=a.resume, overwrite=a.overwrite))
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from mimkd.config import load_config
    from mimkd.engine.setup import run

    base = _flags_to_config(a)
    if a.student:
        base.setdefault("student", {})["arch"] = a.student
    if a.teacher or a.teacher_arch:
        t = base.setdefault("teacher", {})
        t["arch"] = a.teacher_arch or "auto"
        if a.teacher:
            t["checkpoint"] = a.teacher
    if a.method:
        base.setdefault("method", {})["name"] = a.method
    cfg = load_config(a.config, a.overrides, base)
    _print_summary(run(cfg, resume=a.resume, overwrite=a.overwrite))
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from mimkd.engine.finetune import finetune_config
    from mimkd.engine.setup import run

    cfg = finetune_config(
        a.checkpoint,
        _flags_to_config(a),
        a.config,
        a.overrides,
        mode=a.mode,
        preset=a.preset,
        arch=a.arch,
    )
    _print_summary(run(cfg, resume=a.resume, overwrite=a.overwrite))
    return 0


def _pct(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


def _print_summary(s: dict[str, Any]) -> None:
    from mimkd.engine.distributed import is_main_process
    from mimkd.engine.summary import chance_top1, is_near_chance

    if not is_main_process():  # under torchrun every rank returns the summary: print it once
        return
    last, best = s.get("last") or {}, s.get("best") or {}
    lines = [f"method {s.get('method')}  student {s.get('student')}  data {s.get('data')}"]
    if s.get("teacher_test_top1") is not None:
        lines.append(f"  teacher {s.get('teacher')}: top-1 {s['teacher_test_top1']:.2f}")
    if s.get("evaluation"):
        lines.append(f"  {s['evaluation']}")
    else:
        epoch = last.get("epoch")
        lines += [
            f"  last epoch {epoch + 1 if epoch is not None else '-'}: top-1 {_pct(last.get('top1'))}  "
            f"top-5 {_pct(last.get('top5'))}",
            f"  best epoch {best.get('epoch', -1) + 1}: top-1 {_pct(best.get('top1'))}",
        ]
    for name, net in list((s.get("networks") or {}).items())[1:]:
        nb = net.get("best") or {}
        lines.append(
            f"  network {name} ({net.get('arch')}): last top-1 {_pct((net.get('last') or {}).get('top1'))}  "
            f"best top-1 {_pct(nb.get('top1'))}"
        )
    lines.append(f"  wall time {s.get('wall_time_s', 0):.0f} s")
    if is_near_chance(s):
        classes = s.get("num_classes")
        chance = f" ({chance_top1(classes):.2f} %)" if classes else ""
        lines.append(
            f"  WARNING: test accuracy {_pct(last.get('top1'))} % is near chance{chance}: too few steps, or "
            "a learning rate too high (or too low)"
        )
    print("\n".join(lines))


def cmd_list(a: argparse.Namespace) -> int:
    if a.command == "models":
        from mimkd.models import available
    elif a.command == "methods":
        from mimkd.distillers import available
    else:
        from mimkd.data import available_datasets as available
    print("\n".join(available()))
    return 0


def cmd_describe(a: argparse.Namespace) -> int:
    from mimkd.describe import describe, format_description

    info = describe(
        a.method, a.student, a.teacher, data=a.data, image_size=a.image_size, overrides=a.overrides
    )
    print(json.dumps(info, indent=2) if a.json else format_description(info))
    return 0


def cmd_latency(a: argparse.Namespace) -> int:
    import json

    import torch

    from mimkd.data import dataset_spec
    from mimkd.evaluation import count_flops, count_parameters, latency_profile
    from mimkd.models import build_network

    spec = dataset_spec(a.data)
    channels, size = spec.channels, a.image_size or spec.image_size or 224
    classes = spec.num_classes or 1000
    rows = []
    for arch in a.models:
        net = build_network(arch, classes, channels)
        prof = latency_profile(net, (channels, size, size), runs=a.runs)
        x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
        rows.append(
            {
                "model": arch,
                "params": count_parameters(net),
                "flops": count_flops(net.eval(), x),
                "ms_1_thread": prof["1_thread"]["median_ms"],
                "ms_all_threads": prof["all_threads"]["median_ms"],
                "threads": prof["all_threads"]["threads"],
            }
        )
    if a.json:
        print(json.dumps({"input": [1, channels, size, size], "runs": a.runs, "rows": rows}, indent=2))
        return 0
    print(
        f"single-image CPU latency, input 1x{channels}x{size}x{size}, median of {a.runs} runs "
        "(this machine only)"
    )
    print(f"{'model':<22}{'params':>12}{'MFLOPs':>10}{'1 thread ms':>14}{'all threads ms':>17}")
    for r in rows:
        print(
            f"{r['model']:<22}{r['params']:>12,}{r['flops'] / 1e6:>10.1f}{r['ms_1_thread']:>14.2f}"
            f"{r['ms_all_threads']:>12.2f} ({r['threads']})"
        )
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from mimkd.evaluation.export import export_run

    r = export_run(a.run, a.format, out=a.out, which=a.which, network=a.network)
    size = r.out.stat().st_size
    print(
        f"exported {r.checkpoint} ({r.arch}, {r.parameters:,} parameters, {r.num_classes} classes, "
        f"{r.in_channels} input channels)\n  -> {r.out} ({r.fmt}, {size / 1024:.1f} KiB)"
    )
    if r.input is not None:
        c, h, w = r.input["shape"]
        mean, std = (", ".join(f"{x:.4f}" for x in r.input[k]) for k in ("mean", "std"))
        print(
            f"  input: {c}×{h}×{w}, x = (pixels / 255 - mean) / std per channel, mean ({mean}), std ({std}) "
            "(also in the file's metadata)"
        )
    else:
        print("  input: this checkpoint does not record its normalisation (written before mimkd recorded it)")
    for note in r.notes:
        print(f"  {note}")
    if r.max_abs_diff is not None:
        print(
            f"  check on {r.batch_source} ({r.checked_with}): max abs difference {r.max_abs_diff:.3g} vs the "
            "PyTorch student"
        )
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from mimkd.demo import run_demo

    run_demo(
        out_dir=a.out,
        cache_dir=a.cache,
        seeds=a.seeds,
        epochs=a.epochs,
        workers=a.workers,
        progress=a.progress,
        teacher_epochs=a.teacher_epochs,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mimkd",
        description="Knowledge distillation by mutual information maximisation, and the baseline zoo.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one network (a teacher, or a vanilla student)")
    t.add_argument("--model", help="zoo name (mimkd models) or package.module:factory")
    _add_run_flags(t)
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("distill", help="distill a teacher into a student with a method")
    d.add_argument("--teacher", help="teacher checkpoint (a mimkd run, or {'model': state_dict} file)")
    d.add_argument("--teacher-arch", help="teacher architecture (needed when the checkpoint does not say)")
    d.add_argument("--student", help="student architecture")
    d.add_argument("--method", help="distillation method (mimkd methods lists them)")
    _add_run_flags(d)
    d.set_defaults(fn=cmd_distill)

    f = sub.add_parser(
        "finetune",
        help="fine-tune a trained backbone (KDEP pre-training, distilled or plain run) on a dataset",
        description="Build the architecture recorded in the checkpoint, load every weight but the classifier "
        "(the last nn.Linear, re-initialised for the dataset's classes) and train it as a vanilla run.",
    )
    f.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR", help="checkpoint file or run directory (last.pt)")
    f.add_argument(
        "--mode",
        choices=["linear", "full"],
        help="linear: frozen backbone (eval mode), only the classifier trains; full (default): everything",
    )
    f.add_argument(
        "--preset",
        choices=["kdep"],
        help="kdep: SGD 0.9, 150 epochs, batch 64, wd 5e-4, lr 0.01, /10 at 1/3 and 2/3 (KDEP supp. B.2)",
    )
    f.add_argument("--arch", help="architecture, for checkpoints that do not record it")
    _add_run_flags(f)
    f.set_defaults(fn=cmd_finetune)

    lat = sub.add_parser("latency", help="single-image CPU latency of models (1 thread and all threads)")
    lat.add_argument("models", nargs="+", metavar="MODEL", help="zoo names or package.module:factory")
    lat.add_argument("--data", default="cifar100", help="dataset whose input shape and classes to assume")
    lat.add_argument("--image-size", type=int)
    lat.add_argument("--runs", type=int, default=100, help="timed calls per measurement (median reported)")
    lat.add_argument("--json", action="store_true")
    lat.set_defaults(fn=cmd_latency)

    x = sub.add_parser(
        "export",
        help="export a run's student alone (ONNX, safetensors, TorchScript), checked on real test images",
        description="Build the architecture recorded in the checkpoint, load its student weights (only the "
        "'model' entry: no critics, heads or banks), export it and check the artefact's outputs against the "
        "PyTorch student on up to 16 test images of the run's dataset.",
    )
    x.add_argument(
        "run", metavar="RUN_DIR_OR_CKPT", help="run directory (best.pt, else last.pt) or checkpoint"
    )
    x.add_argument("--format", required=True, choices=["onnx", "safetensors", "torchscript"])
    x.add_argument("--out", help="output file (default: RUN_DIR/export/<checkpoint stem>.<format suffix>)")
    x.add_argument("--which", choices=["best", "last"], help="checkpoint of a run directory (default: best)")
    x.add_argument("--network", help="another network of a DML/DCM cohort, e.g. net2 (its best_net2.pt)")
    x.set_defaults(fn=cmd_export)

    s = sub.add_parser("describe", help="feature pairs, critic shapes, parameters and FLOPs of a method")
    s.add_argument("--teacher", help="teacher architecture (not for dml/dcm)")
    s.add_argument("--student", required=True, help="student architecture")
    s.add_argument("--method", default="mimkd")
    s.add_argument("--data", default="cifar100", help="dataset whose input shape and classes to assume")
    s.add_argument("--image-size", type=int)
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --set method.critic_width=256",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_describe)

    m = sub.add_parser("demo", help="the embedded default: vanilla, kd, mimkd and mimkd+kd on Fashion-MNIST")
    m.add_argument("--out", default="runs/demo", help="where runs, table and plot go")
    m.add_argument("--cache", default=None, help="teacher cache directory (default: ~/.cache/mimkd)")
    m.add_argument("--seeds", type=int, default=3)
    m.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's)")
    m.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help="teacher epochs, for shortened runs and CI (default: the demo's)",
    )
    m.add_argument("--workers", type=int, default=None, help="runs in parallel (default: CPU cores)")
    m.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    m.set_defaults(fn=cmd_demo)

    from mimkd.evaluation.bench import register_cli as add_bench_command
    from mimkd.experiments.cli import register_cli as add_study_commands
    from mimkd.probe_command import register_cli as add_probe_command

    add_study_commands(sub)
    add_probe_command(sub)
    add_bench_command(sub)

    for name, help_ in (
        ("models", "list zoo models"),
        ("methods", "list methods"),
        ("datasets", "list datasets"),
    ):
        sub.add_parser(name, help=help_).set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    install_warning_format()  # mimkd's warnings as one line each: "mimkd: warning: ..."
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except MimkdError as e:
        if os.environ.get("MIMKD_DEBUG"):
            raise
        print(f"mimkd: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("mimkd: interrupted; a run can be continued with --resume", file=sys.stderr)
        return 130


def set_openmp_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.

    Measured on a 2-core machine (``results/engine_options_cpu.md``): libgomp's default (spin about 3 ms,
    then sleep) is 1.1-1.5x faster at 2 threads when the machine is idle, and 1.3-2.7x slower when one other
    process is busy on it (up to 16x under heavier load); passive waiting has the best worst case. On an idle
    machine, ``GOMP_SPINCOUNT=300000`` restores libgomp's default. Must run before torch is imported.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def entry() -> None:
    """The ``mimkd`` console command (and ``python -m mimkd``): tcmalloc if available, then :func:`main`.

    The OpenMP wait policy is set first, before torch loads (:func:`set_openmp_wait_policy`).
    """
    set_openmp_wait_policy()
    from mimkd.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc(["-m", "mimkd", *sys.argv[1:]])
    sys.exit(main())


if __name__ == "__main__":
    entry()
