"""Experiment trackers (docs/trackers.md): real runs on real Fashion-MNIST, read back from the backends.

* One two-stage FitNets run (an init stage, then 2 epochs) with ``train.loggers=[tensorboard,mlflow,wandb]``:
  the MLflow file store (``./mlruns`` of the run's working directory, read through ``MlflowClient``) and the
  offline W&B run (its ``.wandb`` transaction log, parsed with wandb's own protobuf records) hold the metric
  keys, steps and values of ``metrics.jsonl``, the resolved configuration, and summary.json / best.pt.
* A run killed after its first checkpoint and resumed continues the same MLflow and W&B run.
* A backend whose package cannot be imported: exit 2 and one ``mimkd: error:`` line naming the extra.
* Only rank 0 opens a tracker: the gate itself, and a 2-process torchrun launch that creates one MLflow run.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import needs_fmnist

pytestmark = needs_fmnist
mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

SPE = 6  # train.max_steps_per_epoch


def _env(root: Path) -> dict[str, str]:
    """The child's environment: offline W&B writing under ``root``, MLflow at its default (``./mlruns``)."""
    drop = ("MLFLOW_", "WANDB_", "MIMKD_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(root / "wandb_dir"))
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "cfg")):
        env[var] = str(root / "wandb_home" / sub)
    (root / "wandb_dir").mkdir(parents=True, exist_ok=True)
    return env


def _mimkd(root: Path, args: list[str], prefix: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = prefix if prefix is not None else [sys.executable, "-m", "mimkd"]
    return subprocess.run(
        [*cmd, *args], cwd=root, env=_env(root), capture_output=True, text=True, timeout=600, **kw
    )


def _teacher(root: Path) -> Path:
    """A cnn_teacher checkpoint with seeded random weights (the trackers need a run, not a good teacher)."""
    from mimkd.models import build_network

    torch.manual_seed(11)
    path = root / "teacher.pt"
    torch.save({"model": build_network("cnn_teacher", 10, 1).state_dict(), "arch": "cnn_teacher"}, path)
    return path


def _run_args(teacher: Path, name: str, loggers: str, epochs: int = 2, spe: int = SPE) -> list[str]:
    return [
        "distill", "--teacher", str(teacher), "--student", "conv4mp_w32", "--method", "fitnets",
        "--set", "method.two_stage=true", "--set", "method.init_epochs=1",
        "--data", "fashion_mnist", "--train-fraction", "0.02", "--set", "data.test_fraction=0.05",
        "--batch-size", "32", "--threads", "1", "--epochs", str(epochs), "--no-progress",
        "--set", f"train.max_steps_per_epoch={spe}", "--set", f"train.loggers={loggers}",
        "--set", "train.log_checkpoints=true", "--set", "train.measure_latency=false",
        "--set", "train.eval_teacher=false", "--out", "runs", "--name", name,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    proc = _mimkd(root, _run_args(_teacher(root), "r", "[tensorboard,mlflow,wandb]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "runs" / "r"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "root": root,
        "run": run,
        "records": records,
        "state": json.loads((run / "trackers.json").read_text()),
    }


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] as metrics.jsonl holds them: init-stage records at step 0, epoch e's at the
    global step after it, (e + 1) × steps per epoch."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        step = 0 if "stage_index" in rec else (rec["epoch"] + 1) * SPE
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((step, float(v)))
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def _client(uri: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.7 refuses the file store otherwise
    return MlflowClient(tracking_uri=uri)


def test_mlflow_file_store_holds_metrics_params_and_artefacts(tracked, monkeypatch, tmp_path):
    st = tracked["state"]["mlflow"]
    assert st["tracking_uri"] == (tracked["root"] / "mlruns").as_uri()  # ./mlruns of the working directory
    client = _client(st["tracking_uri"], monkeypatch)
    run = client.get_run(st["run_id"])
    assert run.info.run_name == "r" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "runs"  # the directory holding the run
    expected = _expected(tracked["records"])
    assert {r["stage"] for r in tracked["records"] if "stage" in r} == {"hint"}  # an init stage ran
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(got) == sorted(points), key
    config = yaml.safe_load((tracked["run"] / "config.yaml").read_text())
    assert run.data.params == _flat(config)
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["method.name"] == "fitnets"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "best.pt"}
    got = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(got).read_text()) == json.loads((tracked["run"] / "summary.json").read_text())


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: wandb's LevelDB-style log (7-byte header, 32 KiB blocks, chunks with
    a 7-byte header: CRC, length, type full/first/middle/last), each record a wandb ``Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:  # block padding
            pos += block - pos % block
            continue
        if pos + 7 + n > len(data):  # the last chunk of a killed writer
            return
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _wandb_run(root: Path, run_id: str) -> dict:
    files = sorted((root / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    config, rows, saved = {}, [], set()
    for f in files:
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
            config.update({u.key: json.loads(u.value_json) for u in updates})
            if kind == "history":
                rows.append(
                    {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                )
            elif kind == "files":
                saved |= {x.path for x in r.files.files}
    return {"files": files, "config": config, "rows": rows, "saved": saved}


def test_wandb_offline_run_holds_metrics_config_and_files(tracked):
    st = tracked["state"]["wandb"]
    got = _wandb_run(tracked["root"], st["id"])
    assert len(got["files"]) == 1 and st["project"] == "runs"
    points: dict[str, list[tuple[int, float]]] = {}
    for row in got["rows"]:
        for k, v in row.items():
            if not k.startswith("_") and k != "global_step":
                points.setdefault(k, []).append((row["global_step"], float(v)))
    assert points == _expected(tracked["records"])
    config = yaml.safe_load((tracked["run"] / "config.yaml").read_text())
    assert {k: v for k, v in got["config"].items() if k != "_wandb"} == config
    assert {"summary.json", "best.pt"} <= got["saved"]
    copy = got["files"][0].parent / "files" / "summary.json"
    assert copy.read_text() == (tracked["run"] / "summary.json").read_text()


def test_tensorboard_still_gets_the_records(tracked):
    assert len(list((tracked["run"] / "tb").glob("events.*"))) == 1


def test_a_killed_run_resumes_the_same_tracker_runs(tmp_path, monkeypatch):
    args = _run_args(_teacher(tmp_path), "k", "[mlflow,wandb]", epochs=3, spe=12)
    args += ["--set", "train.checkpoint_every_steps=4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mimkd", *args], cwd=tmp_path, env=_env(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics, deadline = tmp_path / "runs" / "k" / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and proc.poll() is None:
        assert time.time() < deadline, "no first epoch within 300 s"
        time.sleep(0.02)  # the init stage's record and the first epoch's: then SIGKILL, mid-run
    proc.kill()
    assert proc.wait() != 0, "the run finished before it was killed"
    first = json.loads((tmp_path / "runs" / "k" / "trackers.json").read_text())
    done = _mimkd(tmp_path, [*args, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "k" / "trackers.json").read_text())
    assert state == first  # the same run ids
    client = _client(state["mlflow"]["tracking_uri"], monkeypatch)
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    epochs = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert sorted(set(epochs)) == [(12, 0.0), (24, 1.0), (36, 2.0)]
    wb = _wandb_run(tmp_path, state["wandb"]["id"])
    assert len(wb["files"]) == 2  # offline: one directory per session, one run id
    # W&B writes asynchronously: a row logged just before the kill may never reach its file (docs/trackers.md)
    assert {1, 2} <= {row["epoch"] for row in wb["rows"] if "epoch" in row} <= {0, 1, 2}


BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
from mimkd.cli import main  # not entry(): it re-executes the interpreter (tcmalloc), losing the blocker
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module", ["mlflow", "wandb"])
def test_a_missing_backend_is_one_line_naming_the_extra(tmp_path, module):
    teacher = _teacher(tmp_path)
    proc = _mimkd(
        tmp_path,
        _run_args(teacher, "m", f"[{module}]"),
        [sys.executable, "-c", BLOCKED.format(module=module)],
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("mimkd: error: train.loggers:"), proc.stderr
    assert f"pip install 'mimkd[{module}]'" in lines[0]
    assert not (tmp_path / "runs" / "m").exists() and not (tmp_path / "mlruns").exists()


def test_only_rank_0_opens_trackers(tmp_path, monkeypatch):
    from mimkd.engine.trackers import open_trackers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert open_trackers(["tensorboard", "mlflow", "wandb"], tmp_path / "r", {"seed": 0}, is_main=False) == []
    assert list(tmp_path.iterdir()) == []  # no mlruns, no wandb directory, no trackers.json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_create_one_mlflow_run(tmp_path, monkeypatch):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    prefix = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]
    args = [
        "train", "--model", "conv4mp_w32", "--data", "fashion_mnist", "--train-fraction", "0.02",
        "--set", "data.test_fraction=0.05", "--batch-size", "16", "--epochs", "1", "--no-progress",
        "--set", "train.max_steps_per_epoch=4", "--set", "train.measure_latency=false",
        "--set", "train.loggers=[mlflow]", "--out", "runs", "--name", "d",
    ]  # fmt: skip
    proc = _mimkd(tmp_path, args, [*prefix, "-m", "mimkd"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _client((tmp_path / "mlruns").as_uri(), monkeypatch)
    (experiment,) = [e for e in client.search_experiments() if e.name == "runs"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")] == [(4, 0.0)]


def test_a_file_store_left_half_written_by_a_kill_is_repaired_on_resume(tmp_path, monkeypatch):
    """SIGKILL can leave a metric file empty or with a partial last line; MLflow then refuses the whole run
    ("Metric ... is malformed"). The resumed tracker repairs that file and continues the same run."""
    from mimkd.engine.trackers import MlflowTracker, TrackerContext

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    first = MlflowTracker(TrackerContext(run_dir, {"seed": 0}))
    first.log({"lr": 0.05, "loss.ce": 2.0}, 6)
    first.log({"lr": 0.04, "loss.ce": 1.5}, 12)
    metrics = next((tmp_path / "mlruns").glob(f"*/{first.run_id}/metrics"))
    (metrics / "lr").write_bytes(b"")  # killed after creating the file
    ce = metrics / "loss.ce"
    ce.write_bytes(ce.read_bytes() + b"1733300000000 1.2")  # killed mid-line
    again = MlflowTracker(TrackerContext(run_dir, {"seed": 0}, resume=True, saved=first.state()))
    assert again.run_id == first.run_id
    again.log({"lr": 0.03, "loss.ce": 1.0}, 18)
    again.close()
    client = _client((tmp_path / "mlruns").as_uri(), monkeypatch)
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss.ce")] == [
        (6, 2.0),
        (12, 1.5),
        (18, 1.0),
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "lr")] == [(18, 0.03)]
