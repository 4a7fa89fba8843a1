"""Run logging: ``metrics.jsonl`` (one line per epoch) mirrored to the trackers, the progress bar, meters."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mimkd.errors import MimkdWarning

from .trackers import Tracker, metric_values

__all__ = ["LaggedScalars", "MetricsLog", "Meter", "NullLog", "progress_bar", "write_json"]


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class Meter:
    """Running sums of named values, kept as tensors so the training step never waits on the device.

    ``add(values, n, keep)``: with a device bool ``keep`` (a deferred non-finite check) the values count only
    when it is True, and the image count itself becomes a device tensor, read at :meth:`means`.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: int | torch.Tensor = 0

    def add(self, values: dict[str, torch.Tensor], n: int = 1, keep: torch.Tensor | None = None) -> None:
        for k, v in values.items():
            v = v.detach().float() * n
            if keep is not None:
                v = torch.where(keep, v, torch.zeros_like(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count = self.count + (n if keep is None else keep.long() * n)

    def means(self) -> dict[str, float]:
        count = max(float(self.count), 1.0)
        return {k: float(v) / count for k, v in self.sums.items()}

    def reduced(self) -> Meter:
        """A copy summed over the ranks of a distributed run (collective: every rank must call it)."""
        from .distributed import all_reduce_sum, current

        out = Meter()
        out.sums = dict(self.sums)
        out.count = self.count
        if not current().enabled:
            return out
        keys = sorted(self.sums)
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        flat = torch.stack([*(self.sums[k].float().reshape(()) for k in keys), torch.as_tensor(
            self.count, dtype=torch.float32, device=device
        ).reshape(())]).to(torch.float64)  # fmt: skip
        all_reduce_sum(flat)
        out.sums = {k: flat[i].to(torch.float32) for i, k in enumerate(keys)}
        out.count = int(round(float(flat[-1])))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": int(self.count)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = int(state["count"])


class LaggedScalars:
    """Scalars for the progress bar, read without waiting for the device.

    On CUDA :meth:`push` copies the values into pinned host memory behind an event (asynchronously) and
    :meth:`latest` returns the newest copy that has arrived, so the bar shows values a few steps old instead
    of stalling the step. Elsewhere the values are read directly (nothing to wait for).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[list[str], torch.Tensor, Any]] = []
        self._latest: dict[str, float] | None = None

    def push(self, values: dict[str, torch.Tensor]) -> None:
        keys = list(values)
        flat = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        if flat.device.type != "cuda":
            self._latest = dict(zip(keys, flat.tolist()))
            return
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((keys, host, event))
        del self._pending[:-4]  # never keep more than a few copies in flight

    def latest(self) -> dict[str, float] | None:
        while self._pending and self._pending[0][2].query():
            keys, host, _ = self._pending.pop(0)
            self._latest = dict(zip(keys, host.tolist()))
        return self._latest


class MetricsLog:
    """Appends per-epoch records to ``metrics.jsonl`` and mirrors them to the run's experiment trackers
    (``train.loggers``: TensorBoard, MLflow, W&B; see docs/trackers.md and :mod:`.trackers`)."""

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.trackers = list(trackers)

    def truncate_from_epoch(self, epoch: int, init_position: tuple[int, int] | None = None) -> None:
        """Drop records of epochs >= ``epoch`` (they are redone after a resume), and init-stage records at
        (stage, epoch) >= ``init_position`` when the run resumes inside an init stage."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
                if "stage_index" in rec:
                    pos = (rec["stage_index"], rec["stage_epoch"])
                    if init_position is None or pos < init_position:
                        keep.append(line)
                elif rec.get("epoch", -1) < epoch:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write(self, record: dict[str, Any], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()
        values = metric_values(record)
        self._each(lambda t: t.log(values, step))

    def scalars(self, values: dict[str, Any], step: int) -> None:
        """Per-step scalars to TensorBoard only (the term-gradient diagnostics of a logged step)."""
        if self.trackers:  # (a device read: only when someone takes them)
            values = {k: float(v) for k, v in values.items()}
            self._each(lambda t: t.scalars(values, step))

    def store(self, paths: Iterable[Path]) -> None:
        """Give the trackers the run's files at its end (``summary.json``, ``best.pt``)."""
        for path in paths:
            self._each(lambda t, path=path: t.store(path))

    def _each(self, call: Callable[[Tracker], None]) -> None:
        """``call`` on every tracker; one that fails (a server gone) is dropped with a warning: the run and
        ``metrics.jsonl`` go on."""
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:
                self.trackers.remove(t)
                warnings.warn(
                    f"train.loggers: {type(t).__name__} failed ({' '.join(str(e).split())[:300]}); it gets "
                    "nothing more from this run (metrics.jsonl does)",
                    MimkdWarning,
                    stacklevel=2,
                )

    def close(self, ok: bool = True) -> None:
        """End every tracker's run (``ok``: the run finished; else it failed)."""
        self._each(lambda t: t.close(ok))
        self.trackers = []


class NullLog:
    """The metrics log of a non-zero rank in a distributed run: it writes nothing."""

    path = None

    def truncate_from_epoch(self, epoch: int, init_position: tuple[int, int] | None = None) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        return []

    def write(self, record: dict[str, Any], step: int) -> None:
        pass

    def scalars(self, values: dict[str, Any], step: int) -> None:
        pass

    def store(self, paths: Iterable[Path]) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool | None, initial: int = 0):
    """A tqdm bar on stderr; with ``enabled=None`` it shows only when stderr is a terminal."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        unit="step",
    )
