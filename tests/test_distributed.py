"""Data-parallel training on a CPU (gloo): real processes, real Fashion-MNIST, the trainer's own step.

* A seeded 2-process run (batch 16 per process) matches the 1-process run with batch 32 step by step (the
  same losses to float tolerance, the same weights) for kd and crd; crd's memory banks are identical on both
  ranks and match the 1-process banks. MIMKD (per-rank BatchNorm in its critic, per-rank in-batch negatives
  by design: see ONE_PROCESS) keeps identical banks on both ranks.
* Resume under DDP: a 2-process run stopped after its first epoch and resumed ends bit-identical to an
  uninterrupted one; a checkpoint of 2 processes refuses to resume in 1.
* ``torchrun --nproc_per_node 2 -m mimkd distill`` end to end: rank 0 alone writes.
* The student is a BatchNorm-free CNN (below): per-process BatchNorm would normalise each half batch on its
  own, and SyncBatchNorm runs on CUDA only in torch 2.13 (on a CPU ``train.sync_bn`` is refused; tested).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import needs_fmnist

pytestmark = needs_fmnist

TESTS = Path(__file__).parent
STEPS = 5
# Methods whose 2-process run must equal the 1-process run at the global batch. MIMKD cannot: its global
# critic's projection heads hold a BatchNorm1d (per-rank statistics, as any BatchNorm without SyncBN) and its
# local/feature JSD terms pair each sample with a negative of its own rank's batch; its banks are still
# identical on every rank.
ONE_PROCESS = ("kd", "crd")


def nobn_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small CNN without BatchNorm (its output does not depend on how a batch is split across ranks)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METHODS = {
    "kd": {"name": "kd"},
    "crd": {"name": "crd", "num_negatives": 128},
    "mimkd": {"name": "mimkd", "critic_width": 16, "embed_dim": 32, "num_negatives": 128},
}


def _config(teacher: str, out: str, method: dict, batch: int, **train) -> dict:
    return {
        "seed": 5,
        "device": "cpu",
        "threads": 1,
        "out_dir": out,
        "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.05, "augment": False},
        "student": {"arch": "test_distributed:nobn_cnn"},
        "teacher": {"arch": "cnn_teacher", "checkpoint": teacher},
        "method": method,
        "optim": {"batch_size": batch, "lr": 0.05, "schedule": "constant", "epochs": 1},
        "train": {
            "tensorboard": False,
            "progress": False,
            "measure_latency": False,
            "eval_teacher": False,
            **train,
        },
    }


def _banks(distiller: nn.Module) -> dict[str, torch.Tensor]:
    from mimkd.mi.memory import MemoryBank

    return {n: m.memory.detach().clone() for n, m in distiller.named_modules() if isinstance(m, MemoryBank)}


def _steps(configs: dict[str, dict]) -> dict[str, dict]:
    """Run STEPS steps of the trainer's step for each config; per step the global mean of every term."""
    from mimkd.config import build_config
    from mimkd.engine import distributed
    from mimkd.engine.setup import prepare
    from mimkd.engine.trainer import StudentInfo, Trainer

    info = distributed.current()
    out = {}
    for name, data in configs.items():
        p = prepare(build_config(data), info, torch.device("cpu"))
        student = StudentInfo(p.student_arch, p.train.num_classes, 1)
        tr = Trainer(
            p.cfg, p.distiller, p.train, p.test, p.run_dir, p.device, student, p.augment, dist_info=info
        )
        tr.distiller.train()
        losses = []
        for k, batch in enumerate(tr.iterator.epoch(0)):
            if k == STEPS:
                break
            res = tr.train_step(
                batch.images.contiguous(memory_format=tr.memory_format), batch.labels, batch.index
            )
            assert res.applied
            terms = torch.stack(list(res.terms.values())).double()
            losses.append(distributed.all_reduce_sum(terms) / info.world_size)
        out[name] = {
            "terms": list(res.terms),
            "losses": torch.stack(losses),
            "banks": _banks(tr.distiller),
            "student": {k: v.detach().clone() for k, v in tr.distiller.student.state_dict().items()},
        }
    return out


def _resume(teacher: str, root: str) -> None:
    """crd, 2 epochs of 4 steps: uninterrupted in A; in B the first epoch, then a resumed second one."""
    from mimkd.config import build_config
    from mimkd.engine import distributed
    from mimkd.engine.setup import prepare
    from mimkd.engine.trainer import StudentInfo, Trainer

    info = distributed.current()

    def fit(name: str, epochs: int, resume: bool) -> None:
        data = _config(teacher, root, METHODS["crd"], 16, max_steps_per_epoch=4, checkpoint_every_steps=3)
        data["optim"]["epochs"] = epochs
        data["name"] = name
        p = prepare(build_config(data), info, torch.device("cpu"))
        student = StudentInfo(p.student_arch, p.train.num_classes, 1)
        Trainer(
            p.cfg, p.distiller, p.train, p.test, p.run_dir, p.device, student, p.augment, dist_info=info
        ).fit(resume=resume)

    fit("A", 2, False)
    fit("B", 1, False)
    fit("B", 2, True)


def _worker(rank: int, world: int, port: int, teacher: str, root: str, configs: dict, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    from mimkd.engine import distributed
    from mimkd.errors import ConfigError

    try:
        with distributed.session("cpu") as (info, _):
            assert info.world_size == world and info.backend == "gloo"
            result = _steps(configs)
            _resume(teacher, root)
            try:
                distributed.check_sync_bn(True, torch.device("cpu"), info)
                result["sync_bn_error"] = None
            except ConfigError as e:
                result["sync_bn_error"] = str(e)
        torch.save(result, Path(root) / f"rank{rank}.pt")  # tensors through a queue need the sender alive
        queue.put((rank, None))
    except BaseException as e:  # report instead of hanging the test
        queue.put((rank, repr(e)))
        raise


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A cnn_teacher checkpoint (seeded random weights: equality tests need a teacher, not a good one)."""
    from mimkd.models import build_network

    torch.manual_seed(11)
    net = build_network("cnn_teacher", 10, 1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": net.state_dict(), "arch": "cnn_teacher"}, path)
    return str(path)


@pytest.fixture(scope="module")
def runs(teacher, tmp_path_factory):
    """The 2-process results (one launch for every check) and the 1-process reference."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ddp")
    two = {name: _config(teacher, str(root), m, 16) for name, m in METHODS.items()}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    t0 = time.time()
    procs = [
        ctx.Process(target=_worker, args=(r, 2, port, teacher, str(root), two, queue), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, error = queue.get(timeout=600)
            assert error is None, f"rank {rank} failed: {error}"
            results[rank] = torch.load(root / f"rank{rank}.pt", weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    seconds = time.time() - t0
    threads = torch.get_num_threads()
    try:
        one = _steps({n: _config(teacher, str(root), m, 32) for n, m in METHODS.items() if n in ONE_PROCESS})
    finally:
        torch.set_num_threads(threads)
    return {"ranks": results, "one": one, "root": root, "seconds": seconds}


@pytest.mark.parametrize("method", ONE_PROCESS)
def test_two_processes_match_one_process_with_the_global_batch(runs, method):
    r0, r1, one = runs["ranks"][0][method], runs["ranks"][1][method], runs["one"][method]
    assert r0["terms"] == one["terms"] and len(r0["terms"]) >= 2
    assert torch.equal(r0["losses"], r1["losses"])  # the all-reduced means: the same on both ranks
    torch.testing.assert_close(r0["losses"], one["losses"], rtol=2e-4, atol=2e-5)
    assert not torch.equal(one["losses"][0], one["losses"][-1])  # the weights moved: several real steps
    for k, v in one["student"].items():
        torch.testing.assert_close(r0["student"][k], v, rtol=1e-3, atol=1e-5, msg=f"student {k}")
        assert torch.equal(r0["student"][k], r1["student"][k]), f"student {k} differs between ranks"


@pytest.mark.parametrize("method", ["crd", "mimkd"])
def test_memory_banks_are_identical_on_every_rank(runs, method):
    b0, b1 = runs["ranks"][0][method]["banks"], runs["ranks"][1][method]["banks"]
    assert len(b0) == 2 and b0.keys() == b1.keys()
    for name, bank in b0.items():
        assert torch.equal(bank, b1[name]), f"{method}: bank {name} differs between ranks"
        if method in ONE_PROCESS:
            ref = runs["one"][method]["banks"][name]
            torch.testing.assert_close(bank, ref, rtol=0, atol=2e-5)
            written = (bank - torch.nn.functional.normalize(bank, dim=1)).abs().sum(1) < 1e-5
            assert int(written.sum()) >= STEPS * 32  # every anchor of every global batch wrote its row


def test_resume_under_ddp_is_bit_identical_and_only_rank_0_writes(runs):
    from mimkd.checkpoint import load_checkpoint

    a = load_checkpoint(runs["root"] / "A" / "last.pt")
    b = load_checkpoint(runs["root"] / "B" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["world_size"] == b["world_size"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after a resume under DDP"
    for k, v in a["method_state"].items():
        assert torch.equal(v, b["method_state"][k]), f"method state {k} differs after a resume under DDP"
    lines = (runs["root"] / "B" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]  # one writer: one record per epoch
    summary = json.loads((runs["root"] / "A" / "summary.json").read_text())
    assert summary["speed"]["world_size"] == 2 and summary["speed"]["global_batch"] == 32


def test_a_two_process_checkpoint_refuses_one_process(runs, teacher):
    from mimkd.config import build_config
    from mimkd.engine.setup import prepare
    from mimkd.engine.trainer import StudentInfo, Trainer
    from mimkd.errors import CheckpointError

    threads = torch.get_num_threads()
    try:
        data = _config(teacher, str(runs["root"]), METHODS["crd"], 16, max_steps_per_epoch=4)
        data["optim"]["epochs"], data["name"] = 2, "A"
        p = prepare(build_config(data))
        tr = Trainer(
            p.cfg, p.distiller, p.train, p.test, p.run_dir, p.device, StudentInfo("x", 10, 1), p.augment
        )
        with pytest.raises(CheckpointError, match="2 process"):
            tr.load(runs["root"] / "A" / "last.pt")
    finally:
        torch.set_num_threads(threads)


def test_sync_bn_on_cpu_is_refused_with_a_clear_error(runs):
    msg = runs["ranks"][0]["sync_bn_error"]
    assert msg is not None and "SyncBatchNorm" in msg and "CUDA" in msg and "\n" not in msg


def _torchrun(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MIMKD_DEBUG"):
        env.pop(k, None)
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "mimkd",
        *args,
    ]
    return subprocess.Popen(cmd, env=env, text=True, **kw)


def _distill_args(teacher: str, out: Path, name: str, epochs: int = 1) -> list[str]:
    return [
        "distill", "--teacher", teacher, "--student", "conv4mp_w32", "--method", "kd",
        "--data", "fashion_mnist", "--train-fraction", "0.02", "--batch-size", "16", "--epochs", str(epochs),
        "--no-progress", "--out", str(out), "--name", name,
        "--set", "data.test_fraction=0.05", "--set", "train.max_steps_per_epoch=8",
        "--set", "train.checkpoint_every_steps=3", "--set", "train.measure_latency=false",
    ]  # fmt: skip


def test_torchrun_distill_end_to_end_rank_0_writes(teacher, tmp_path):
    args = [*_distill_args(teacher, tmp_path, "r"), "--set", "optim.scale_lr=true"]
    proc = _torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["speed"]["world_size"] == 2
    (record,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # one writer
    assert record["lr"] == pytest.approx(2 * 0.05) and summary["speed"]["lr_factor"] == 2  # linear scaling
    assert len(list((run / "tb").glob("events.*"))) == 1  # one TensorBoard writer
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.jsonl",
        "summary.json",
        "tb",
    ]
    assert torch.load(run / "last.pt", weights_only=True)["world_size"] == 2
    assert "Traceback" not in err
    assert out.count("last epoch 1: top-1") == 1  # the summary is printed by rank 0 only


@pytest.mark.slow
def test_torchrun_killed_then_resumed_is_bit_identical(teacher, tmp_path):
    """SIGKILL the whole torchrun launch after its first checkpoint, resume it: the same final weights."""
    ref = _torchrun(
        _distill_args(teacher, tmp_path, "ref", 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    proc = _torchrun(
        _distill_args(teacher, tmp_path, "k", 2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt, deadline = tmp_path / "k" / "last.pt", time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at = torch.load(ckpt, weights_only=True)
    assert at["epoch"] * 1000 + at["step"] < 2000, "the run finished before it was killed"
    res = _torchrun(
        [*_distill_args(teacher, tmp_path, "k", 2), "--resume"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert res.wait(timeout=600) == 0, res.stderr.read()[-3000:]
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in ("ref", "k"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after a killed and resumed torchrun launch"
