"""``mimkd latency``: single-image CPU latency of models."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    lat = sub.add_parser("latency", help="single-image CPU latency of models (1 thread and all threads)")
    lat.add_argument("models", nargs="+", metavar="MODEL", help="zoo names or package.module:factory")
    lat.add_argument("--data", default="cifar100", help="dataset whose input shape and classes to assume")
    lat.add_argument("--image-size", type=int)
    lat.add_argument("--runs", type=int, default=100, help="timed calls per measurement (median reported)")
    lat.add_argument("--json", action="store_true")
    lat.set_defaults(fn=command)
