"""Experiment trackers: the backends ``train.loggers`` names, mirroring ``metrics.jsonl`` (docs/trackers.md).

``metrics.jsonl`` is always written and stays the record of the run; every tracker in ``train.loggers``
(``tensorboard``, ``mlflow``, ``wandb``) receives each of its records at the same step, and at the end of the
run ``summary.json`` (plus ``best.pt`` with ``train.log_checkpoints``). A backend is a small
:class:`Tracker` subclass registered in :data:`TRACKERS`; only rank 0 of a torchrun launch opens any
(:func:`open_trackers`). A backend whose package is missing is refused at set-up (:func:`require`) with the
extra that installs it. A resumed run continues the same MLflow / W&B run: its id is kept in the run
directory's ``trackers.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mimkd.errors import ConfigError

__all__ = ["TRACKERS", "Tracker", "TrackerContext", "flatten", "metric_values", "open_trackers", "require"]

STATE_FILE = "trackers.json"  # the run ids a resumed run continues


@dataclass
class TrackerContext:
    """What a backend is opened with: the run directory, the resolved config (a JSON-able dict), whether the
    run resumes, TensorBoard's purge step, and what this backend stored in ``trackers.json`` before."""

    run_dir: Path
    config: dict[str, Any]
    resume: bool = False
    purge_step: int | None = None
    saved: dict[str, Any] = field(default_factory=dict)


class Tracker:
    """One backend (docs/trackers.md). ``package``: the module that must import; ``extra``: the pip extra."""

    package: ClassVar[str | None] = None
    extra: ClassVar[str | None] = None

    def log(self, values: dict[str, float], step: int) -> None:
        """One ``metrics.jsonl`` record's numbers (:func:`metric_values`) at ``step``."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Per-step diagnostics (``train.log_term_grads``); only TensorBoard keeps them."""

    def store(self, path: Path) -> None:
        """Keep the file ``path`` (``summary.json``, ``best.pt``) with the run."""

    def close(self, ok: bool = True) -> None:
        """End the run: finished (``ok``) or failed."""

    def state(self) -> dict[str, Any]:
        """What ``trackers.json`` keeps for a resume (empty: nothing)."""
        return {}


class TensorBoardTracker(Tracker):
    """Event files in ``RUN/tb``: every number but ``epoch``, ``.`` in names shown as ``/``."""

    def __init__(self, ctx: TrackerContext) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(str(ctx.run_dir / "tb"), purge_step=ctx.purge_step)
        except ImportError:  # tensorboard is a dependency, but keep training if it is broken
            self.writer = None

    def log(self, values: dict[str, float], step: int) -> None:
        self.scalars({k: v for k, v in values.items() if k != "epoch"}, step)
        if self.writer is not None:
            self.writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k.replace(".", "/"), float(v), step)

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow run: ``MLFLOW_TRACKING_URI``, else the file store ``./mlruns``; experiment
    ``MLFLOW_EXPERIMENT_NAME``, else the name of the directory that holds the run directory."""

    package, extra = "mlflow", "mlflow"

    def __init__(self, ctx: TrackerContext) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or ctx.saved.get("tracking_uri") or _local_store()
        if "://" not in self.uri or self.uri.startswith("file:"):  # mlflow >= 3.7 refuses it unless asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = ctx.saved.get("run_id") if ctx.resume else None
        if self.run_id is not None:
            _repair_file_store(self.uri, self.run_id)
        if self.run_id is not None and self._live(self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or ctx.run_dir.resolve().parent.name
        run = self.client.create_run(self._experiment(name), run_name=ctx.run_dir.name)
        self.run_id = run.info.run_id
        self._params(flatten(ctx.config))

    def _live(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created meanwhile by another run (a sweep)
            return self.client.get_experiment_by_name(name).experiment_id

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        longest, per_batch = _mlflow_limits()
        items = [Param(k, v if len(v) <= longest else v[: longest - 3] + "...") for k, v in params.items()]
        for i in range(0, len(items), per_batch):
            self.client.log_batch(self.run_id, params=items[i : i + per_batch])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def store(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}


def _repair_file_store(uri: str, run_id: str) -> None:
    """After a kill, a local file store's metric file may be empty or end in a half-written line, which
    MLflow then refuses to read ("Metric ... is malformed"): drop such a file or that last line."""
    if not uri.startswith("file:") and "://" in uri:
        return
    from urllib.parse import unquote, urlparse

    root = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
    for metric in root.glob(f"*/{run_id}/metrics/**/*"):
        if not metric.is_file():
            continue
        data = metric.read_bytes()
        if data.endswith(b"\n"):
            continue
        keep = data[: data.rfind(b"\n") + 1]
        if keep:
            metric.write_bytes(keep)
        else:
            metric.unlink()


def _local_store() -> str:
    """MLflow's own default location, ``./mlruns`` in the current directory, as a file URI."""
    return (Path.cwd() / "mlruns").as_uri()


def _mlflow_limits() -> tuple[int, int]:
    """The longest parameter value and the most parameters per batch this mlflow accepts."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        return int(MAX_PARAM_VAL_LENGTH), int(MAX_PARAMS_TAGS_PER_BATCH)
    except ImportError:
        return 500, 100


class WandbTracker(Tracker):
    """A W&B run (``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_DIR`` apply; without ``WANDB_DIR`` its files go
    in the run directory). Records are rows whose x-axis is the ``global_step`` value."""

    package, extra = "wandb", "wandb"

    def __init__(self, ctx: TrackerContext) -> None:
        import wandb

        run_id = ctx.saved.get("id") if ctx.resume else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or ctx.run_dir.resolve().parent.name,
            name=ctx.run_dir.name,
            dir=None if os.environ.get("WANDB_DIR") else str(ctx.run_dir),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run.config.update(ctx.config, allow_val_change=True)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "global_step": step})

    def store(self, path: Path) -> None:
        copy = Path(self.run.dir) / path.name  # a copy, not wandb's symlink: the file is final as it is now
        shutil.copyfile(path, copy)
        self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project}


#: ``train.loggers`` names -> backend classes (docs/trackers.md)
TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "wandb": WandbTracker,
}


def require(names: list[str]) -> None:
    """Raise one-line :class:`~mimkd.errors.ConfigError` for a backend whose package does not import
    (docs/trackers.md: the extras)."""
    for name in names:
        cls = TRACKERS[name]
        if cls.package is None:
            continue
        try:
            importlib.import_module(cls.package)
        except ImportError as e:
            raise ConfigError(
                f"train.loggers: {name} needs the {cls.package} package, which does not import here ({e}): "
                f"pip install 'mimkd[{cls.extra}]'"
            ) from None


def open_trackers(
    names: list[str],
    run_dir: Path,
    config: dict[str, Any],
    *,
    is_main: bool,
    resume: bool = False,
    purge_step: int | None = None,
) -> list[Tracker]:
    """Open the backends ``names`` for ``run_dir`` (none but on rank 0: ``is_main``) and record their run
    ids in ``trackers.json`` for a resume (docs/trackers.md)."""
    if not is_main:
        return []
    path = Path(run_dir) / STATE_FILE
    saved = _read_state(path) if resume else {}
    opened: list[Tracker] = []
    for name in names:
        ctx = TrackerContext(Path(run_dir), config, resume, purge_step, dict(saved.get(name) or {}))
        try:
            opened.append(TRACKERS[name](ctx))
        except Exception as e:
            for t in opened:
                t.close(ok=False)
            why = " ".join(str(e).split())
            raise ConfigError(f"train.loggers: cannot start the {name} run: {why}") from e
    state = {name: t.state() for name, t in zip(names, opened) if t.state()}
    if state:
        from .logging import write_json

        write_json(path, {**saved, **state})
    return opened


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record, as the trackers receive them (strings such as an init
    stage's name are left out; docs/trackers.md)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``: strings as they are, anything else as JSON
    (MLflow's parameters, docs/trackers.md)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out
