"""The speed options of the training step (``train.precision``, ``compile``, ``data_on_device``,
``nonfinite_check``) on real Fashion-MNIST batches.

CUDA-only checks (the dataset in GPU memory, no synchronisation inside a step under
``torch.cuda.set_sync_debug_mode("error")``) skip where there is no GPU; on a CPU the same property is
checked through the dispatcher: a deferred step reads no tensor value on the host (no ``.item()``,
``bool()``, ``float()``: the calls that wait for a GPU).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import SMALL_RUN, needs_fmnist, run_cli

pytestmark = needs_fmnist
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def fmnist():
    from mimkd.data import load_dataset, stratified_subset

    ds = load_dataset("fashion_mnist", None, split="train")
    return ds.subset(stratified_subset(ds.labels, 0.01, 0))


def _batch(ds, n: int = 32, device: str = "cpu"):
    from mimkd.data import BatchIterator, dataset_spec

    aug = dataset_spec("fashion_mnist").augment(ds.mean, ds.std, 28, flip=True)
    return next(BatchIterator(ds, n, seed=1, device=device, augment=aug).epoch(0))


def _distiller(method: str, ds, **options):
    from mimkd.distillers import build_distiller
    from mimkd.models import build_network

    torch.manual_seed(0)
    student, teacher = build_network("conv4mp_w32", 10, 1), build_network("cnn_teacher", 10, 1)
    sample = _batch(ds, 8).images
    return build_distiller(
        method, student, teacher, sample, num_classes=10, train_labels=ds.labels, **options
    )


def _step(d, precision: str = "fp32", check: str = "step", **kw):
    from mimkd.config import OptimConfig
    from mimkd.engine.recipe import build_optimizer
    from mimkd.engine.step import TrainStep

    cfg = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4)
    params = [p for _, p in d.trainable_named_parameters()]
    opt = build_optimizer(cfg, params, fused=check == "deferred")
    return TrainStep(d.train(), opt, precision=precision, check=check, **kw)


class _HostReads(TorchDispatchMode):
    """Counts the operators that copy a tensor's value to the host (``.item()``, ``bool()``, ``float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return self.calls["aten._local_scalar_dense.default"]


# -------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("method", ["kd", "mimkd"])
def test_bf16_autocast_steps_are_finite_and_close_to_fp32(fmnist, method):
    opts = {"critic_width": 32, "num_negatives": 64} if method == "mimkd" else {}
    d32, d16 = _distiller(method, fmnist, **opts), _distiller(method, fmnist, **opts)  # the same seed
    s32, s16 = _step(d32, "fp32"), _step(d16, "bf16")
    from mimkd.data import BatchIterator

    batches = list(zip(range(2), BatchIterator(fmnist, 16, seed=2).epoch(0)))
    torch.manual_seed(1)
    fp32 = [s32(b.images, b.labels, b.index) for _, b in batches]
    torch.manual_seed(1)
    bf16 = [s16(b.images, b.labels, b.index) for _, b in batches]
    for a, b in zip(fp32, bf16):
        assert b.applied and all(bool(torch.isfinite(v)) for v in b.terms.values())
        assert b.terms.keys() == a.terms.keys()
        assert float(b.total) == pytest.approx(float(a.total), rel=0.05, abs=0.02)


def test_bad_precision_is_a_clear_error(fmnist):
    from mimkd.errors import ConfigError

    with pytest.raises(ConfigError, match="precision must be fp32 or bf16"):
        _step(_distiller("kd", fmnist), "fp16")


# ------------------------------------------------------------------------------------ non-finite checks
def test_a_deferred_step_reads_nothing_on_the_host_and_a_checked_step_reads_one_flag(fmnist):
    b = _batch(fmnist)
    for check, expected in (("deferred", 0), ("step", 1)):
        step = _step(_distiller("kd", fmnist), check=check)
        step(b.images, b.labels, b.index)  # first step: lazy initialisations
        with _HostReads() as seen:
            out = step(b.images, b.labels, b.index)
        assert seen.reads == expected, (check, seen.calls)
        assert out.applied is (None if check == "deferred" else True)


def test_deferred_check_masks_the_update_and_reports_at_the_boundary(fmnist):
    """A NaN loss in deferred mode: the parameters and the momentum do not move, and status() names the
    term and the position; with skip the next finite step updates normally and the skip is counted."""
    from mimkd.engine.step import TrainStep

    b = _batch(fmnist)
    for policy in ("stop", "skip"):
        d = _distiller("kd", fmnist)
        step: TrainStep = _step(d, check="deferred", on_nonfinite=policy, max_skipped=5)
        step(b.images, b.labels, b.index, position=(0, 0))
        before = {k: v.clone() for k, v in d.student.state_dict().items()}
        momentum = [step.optimizer.state[p]["momentum_buffer"].clone() for p in d.student.parameters()]
        poisoned = b.images.clone()
        poisoned[0, 0, 0, 0] = float("nan")
        out = step(poisoned, b.labels, b.index, position=(0, 1))
        assert not bool(out.keep)
        for k, v in d.student.state_dict().items():
            if v.is_floating_point() and "running" not in k:
                assert torch.equal(v, before[k]), k
        for p, m in zip(d.student.parameters(), momentum):
            assert torch.equal(step.optimizer.state[p]["momentum_buffer"], m)
        step(b.images, b.labels, b.index, position=(0, 2))
        st = step.status()
        if policy == "stop":  # every later update is masked too, and the run must stop here
            assert st.halted and st.position == (0, 1) and "ce" in st.terms
            assert torch.equal(d.student.state_dict()["fc.weight"], before["fc.weight"])
        else:
            assert not st.halted and st.skipped == 1
            assert not torch.equal(d.student.state_dict()["fc.weight"], before["fc.weight"])


def test_deferred_check_needs_a_fused_optimizer(fmnist):
    from mimkd.config import OptimConfig
    from mimkd.engine.recipe import build_optimizer
    from mimkd.engine.step import TrainStep
    from mimkd.errors import ConfigError

    d = _distiller("kd", fmnist)
    cfg = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4)
    with pytest.raises(ConfigError, match="fused"):
        TrainStep(d, build_optimizer(cfg, d.parameters()), check="deferred")


def test_deferred_check_through_the_cli_stops_naming_the_term(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = ["train", "--model", "foreign_models:nan_every_third", *SMALL_RUN, "--epochs", "1"]
    args += ["--set", "train.max_steps_per_epoch=8", "--set", "train.checkpoint_every_steps=1"]
    args += ["--set", "train.nonfinite_check=deferred", "--set", "train.measure_latency=false"]
    p = run_cli(*args, "--out", str(tmp_path), "--name", "stop", check=False, env_extra=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "non-finite loss at epoch 1, step 3: term(s) ce" in p.stderr and "last.pt" in p.stderr
    from mimkd.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "stop" / "last.pt")  # the state after the 2 good steps
    assert ck["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in ck["model"].values())
    assert json.loads((tmp_path / "stop" / "summary.json").read_text())["status"] == "diverged"


# --------------------------------------------------------------------------------------- data placement
def test_batches_built_on_another_storage_device_are_the_same(fmnist):
    from mimkd.data import BatchIterator, dataset_spec
    from mimkd.data.loader import storage_device

    aug = dataset_spec("fashion_mnist").augment(fmnist.mean, fmnist.std, 28, flip=True)
    a = BatchIterator(fmnist, 16, seed=3, augment=aug)
    b = BatchIterator(fmnist, 16, seed=3, augment=aug, storage_device="cpu")
    for x, y in zip(a.epoch(1), b.epoch(1)):
        assert torch.equal(x.images, y.images) and torch.equal(x.index, y.index)
    cpu = torch.device("cpu")
    assert storage_device("auto", fmnist, cpu) == storage_device(False, fmnist, cpu) == cpu


@needs_cuda
def test_cuda_dataset_on_the_gpu_gives_the_cpu_batches(fmnist):
    from mimkd.data import BatchIterator, dataset_spec
    from mimkd.data.loader import storage_device

    dev = torch.device("cuda")
    aug = dataset_spec("fashion_mnist").augment(fmnist.mean, fmnist.std, 28, flip=True)
    on_gpu = BatchIterator(fmnist, 16, seed=3, augment=aug, device=dev)
    via_cpu = BatchIterator(fmnist, 16, seed=3, augment=aug, device=dev, storage_device="cpu")
    on_cpu = BatchIterator(fmnist, 16, seed=3, augment=aug)
    assert on_gpu.images.is_cuda and not via_cpu.images.is_cuda
    for x, y, z in zip(on_gpu.epoch(0), via_cpu.epoch(0), on_cpu.epoch(0)):
        assert x.images.is_cuda and y.images.is_cuda
        torch.testing.assert_close(x.images.cpu(), z.images)
        torch.testing.assert_close(y.images.cpu(), z.images)
    assert storage_device("auto", fmnist, dev) == dev and storage_device(False, fmnist, dev).type == "cpu"


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_step_and_batches_never_synchronise(fmnist, precision):
    """Batches from the GPU-resident dataset and kd steps with the deferred check, under sync debug mode
    "error": any host-device synchronisation raises."""
    from mimkd.data import BatchIterator, dataset_spec

    dev = torch.device("cuda")
    aug = dataset_spec("fashion_mnist").augment(fmnist.mean, fmnist.std, 28, flip=True)
    it = BatchIterator(fmnist, 32, seed=3, augment=aug, device=dev)
    d = _distiller("kd", fmnist).to(dev)
    step = _step(d, precision, check="deferred")
    batches = it.epoch(0)
    first = next(batches)
    step(first.images, first.labels, first.index)  # lazy initialisations (cuDNN, fused kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _, b in zip(range(5), batches):
            step(b.images, b.labels, b.index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not step.status().halted


# -------------------------------------------------------------------------------------------- compile
def test_compile_compiles_tapped_networks_too(fmnist):
    """kd's networks are compiled, and so are MIMKD's feature-tapped ones (scoped capture, compile_distiller);
    a compiled feature method matching eager is tests/test_feature_scope.py."""
    from mimkd.engine.step import compile_distiller

    kd = compile_distiller(_distiller("kd", fmnist))
    assert kd.student._compiled_call_impl is not None and kd.teacher._compiled_call_impl is not None
    mi = compile_distiller(_distiller("mimkd", fmnist, critic_width=16, num_negatives=32))
    assert mi.student._compiled_call_impl is not None and mi.teacher._compiled_call_impl is not None
    assert mi.local_critic._compiled_call_impl is not None


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step(fmnist):
    from mimkd.engine.step import compile_distiller

    eager = _distiller("kd", fmnist)
    compiled = compile_distiller(_distiller("kd", fmnist))  # the same seed (a deepcopy loses the taps)
    b = _batch(fmnist)
    a = _step(eager)(b.images, b.labels, b.index)
    c = _step(compiled)(b.images, b.labels, b.index)
    assert float(c.total) == pytest.approx(float(a.total), rel=1e-4)


@pytest.mark.slow
def test_a_broken_compiler_is_one_clear_line(tmp_path):
    p = run_cli(
        "train", "--model", "conv4mp_w32", *SMALL_RUN, "--epochs", "1", "--set", "train.compile=true",
        "--set", "train.max_steps_per_epoch=2", "--out", str(tmp_path), "--name", "c",
        check=False, env_extra={"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")},
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "train.compile: torch.compile failed" in p.stderr


@pytest.mark.parametrize(
    "env, expected",
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "300000"}, None)],
)
def test_openmp_wait_policy_is_passive_unless_the_environment_chooses(monkeypatch, env, expected):
    from mimkd.cli import set_openmp_wait_policy

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    set_openmp_wait_policy()
    assert os.environ.get("OMP_WAIT_POLICY") == expected
