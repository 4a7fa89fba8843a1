"""The run summary (``summary.json``): what a finished run reports, from its setup, state and records.

Last AND best epoch accuracy (the papers report the last; the best is chosen on the test set), throughput,
the speed settings the run used, the student's single-image CPU latency, every network of a cohort (DML,
DCM), and whether its accuracy stayed near chance (``near_chance``: last accuracy below 1.5× chance).

A finished run never has ``diverged`` set: that is a run the trainer stopped for a non-finite loss (its
``summary.json`` has status ``diverged``). A finished run near chance was too short or its learning rate too
high. Summaries written before the two were told apart have ``diverged: true`` with status ``finished``:
:func:`is_near_chance` and :func:`run_outcome` read those as near chance.
"""

from __future__ import annotations

from typing import Any

from mimkd.evaluation.latency import latency_profile

from .run_state import RunSetup, RunState

__all__ = [
    "build_summary",
    "chance_top1",
    "is_near_chance",
    "run_outcome",
    "count_outcomes",
    "describe_counts",
    "OUTCOMES",
]

#: What became of a run, as :func:`run_outcome` names it; only ``ok`` runs enter means.
OUTCOMES = ("ok", "near_chance", "diverged", "failed", "interrupted", "missing")


def chance_top1(num_classes: int | None) -> float:
    """Top-1 accuracy (%) of guessing among ``num_classes`` classes."""
    return 100.0 / max(int(num_classes or 1), 1)


def is_near_chance(summary: dict[str, Any] | None) -> bool:
    """Whether a finished run's last accuracy is near chance (older summaries: ``diverged`` with status
    ``finished``)."""
    s = summary or {}
    if s.get("status") != "finished":
        return False
    return bool(s.get("near_chance") or ("near_chance" not in s and s.get("diverged")))


def run_outcome(summary: dict[str, Any] | None) -> str:
    """One of :data:`OUTCOMES`: ``ok`` (finished), ``near_chance`` (finished, accuracy near chance),
    ``diverged`` (stopped by a non-finite loss), ``failed`` (an error), ``interrupted`` (any other status),
    ``missing`` (no summary)."""
    if not summary:
        return "missing"
    status = summary.get("status")
    if status == "finished":
        return "near_chance" if is_near_chance(summary) else "ok"
    if status in ("diverged", "failed"):
        return str(status)
    return "interrupted"


def count_outcomes(outcomes: list[str]) -> dict[str, int]:
    """How many of each outcome other than ``ok`` (those that occur, in :data:`OUTCOMES` order)."""
    return {o: outcomes.count(o) for o in OUTCOMES if o != "ok" and o in outcomes}


def describe_counts(counts: dict[str, int]) -> str:
    """``'1 near chance, 2 failed'`` for :func:`count_outcomes`' counts, or '' when there are none."""
    return ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in counts.items() if n)


def build_summary(
    setup: RunSetup,
    state: RunState,
    records: list[dict[str, Any]],
    session_seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of a finished run from its setup, its final state and its epoch ``records``;
    ``session_seconds``: the wall time of this session (earlier sessions of a resumed run are in
    ``state.wall_before``); ``extra``: entries the caller adds (data, teacher, parameter counts)."""
    cfg, d, info = setup.cfg, setup.distiller, setup.student_info
    last = next((r for r in reversed(records) if "test.top1" in r), {})
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    summary = {
        "status": "finished",
        "method": d.name,
        "student": info.arch,
        "epochs": cfg.optim.epochs,
        "last": {
            "epoch": last.get("epoch"),
            "top1": last.get("test.top1"),
            "top5": last.get("test.top5"),
        },
        "best": state.best,
        "wall_time_s": state.wall_before + session_seconds,
        "images_per_s": sum(rates) / len(rates) if rates else None,
        "student_input_shape": list(setup.train_set.image_shape),  # C, H, W (latency, export, probes)
        "num_classes": info.num_classes,
        "skipped_batches": state.skipped,
        "speed": _speed(setup),
        **(extra or {}),
    }
    if cfg.train.measure_latency:  # what the student costs on a CPU, batch 1 (median ms)
        prof = latency_profile(d.student, tuple(setup.train_set.image_shape), runs=30)
        summary["student_cpu_latency_ms"] = {k: v["median_ms"] for k, v in prof.items()}
    if len(d.networks()) > 1:
        summary["networks"] = _networks(setup, state, last)
    if not setup.evaluated:
        summary["evaluation"] = (
            "none: a label-free pre-training has no trained classifier; measure it with mimkd finetune"
        )
    chance = chance_top1(info.num_classes)
    summary["near_chance"] = bool(last.get("test.top1") is not None and last["test.top1"] < 1.5 * chance)
    summary["diverged"] = False  # a finished run; one stopped by a non-finite loss never gets here
    return summary


def _speed(setup: RunSetup) -> dict[str, Any]:
    t = setup.cfg.train
    return {
        "precision": t.precision,
        "compile": t.compile,
        "channels_last": t.channels_last,
        "nonfinite_check": setup.check,
        "data_on_device": setup.storage == setup.device,
        "world_size": setup.dist.world_size,
        "global_batch": setup.cfg.optim.batch_size * setup.dist.world_size,
        "lr_factor": setup.lr_factor,
    }


def _networks(setup: RunSetup, state: RunState, last: dict[str, Any]) -> dict[str, Any]:
    d = setup.distiller
    return {
        name: {
            "arch": setup.student_info.arch if i == 0 else d.network_arch(name),
            "params": sum(p.numel() for p in net.parameters()),
            "last": {
                "epoch": last.get("epoch"),
                "top1": last.get("test.top1" if i == 0 else f"test.{name}.top1"),
                "top5": last.get("test.top5" if i == 0 else f"test.{name}.top5"),
            },
            "best": state.best if i == 0 else state.best_networks.get(name),
        }
        for i, (name, net) in enumerate(d.networks().items())
    }
