"""``mimkd export``: a run's student alone (ONNX, safetensors, TorchScript), checked on real images."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.evaluation.export import export_run
    from mimkd.evaluation.export_hf import export_run_hf

    if a.format == "hf":  # a Hugging Face Hub folder (docs/teachers.md)
        r = export_run_hf(a.run, out=a.out, which=a.which, network=a.network)
    else:
        r = export_run(a.run, a.format, out=a.out, which=a.which, network=a.network)
    size = sum(f.stat().st_size for f in r.out.iterdir()) if r.out.is_dir() else r.out.stat().st_size
    print(
        f"exported {r.checkpoint} ({r.arch}, {r.parameters:,} parameters, {r.num_classes} classes, "
        f"{r.in_channels} input channels)\n  -> {r.out} ({r.fmt}, {size / 1024:.1f} KiB)"
    )
    if r.input is not None:
        c, h, w = r.input["shape"]
        mean, std = (", ".join(f"{x:.4f}" for x in r.input[k]) for k in ("mean", "std"))
        where = "config.json" if r.fmt == "hf" else "the file's metadata"
        print(
            f"  input: {c}×{h}×{w}, x = (pixels / 255 - mean) / std per channel, mean ({mean}), std ({std}) "
            f"(also in {where})"
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    x = sub.add_parser(
        "export",
        help="export a run's student alone (ONNX, safetensors, TorchScript, a Hub folder), checked on real "
        "test images",
        description="Build the architecture recorded in the checkpoint, load its student weights (only the "
        "'model' entry: no critics, heads or banks), export it and check the artefact's outputs against the "
        "PyTorch student on up to 16 test images of the run's dataset.",
    )
    x.add_argument(
        "run", metavar="RUN_DIR_OR_CKPT", help="run directory (best.pt, else last.pt) or checkpoint"
    )
    x.add_argument(
        "--format",
        required=True,
        choices=["onnx", "safetensors", "torchscript", "hf"],
        help="hf: a Hugging Face Hub folder (model.safetensors, config.json, README.md; docs/teachers.md)",
    )
    x.add_argument(
        "--out", help="output file (default: RUN_DIR/export/<checkpoint stem>.<format suffix>; hf: a folder)"
    )
    x.add_argument("--which", choices=["best", "last"], help="checkpoint of a run directory (default: best)")
    x.add_argument("--network", help="another network of a DML/DCM cohort, e.g. net2 (its best_net2.pt)")
    x.set_defaults(fn=command)
