"""Run logging: ``metrics.jsonl`` (one line per epoch), TensorBoard events, the progress bar, meters."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "Meter", "progress_bar", "write_json"]


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
    """Running sums of named values, kept as tensors so the training step never waits on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor], n: int = 1) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v * n if k in self.sums else v * n
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = int(state["count"])


class MetricsLog:
    """Appends per-epoch records to ``metrics.jsonl`` and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                self.writer = None

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
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch",):
                    self.writer.add_scalar(k.replace(".", "/"), v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
