"""``mimkd bench``: rows, FLOP counts, report files, option and method resolution, the CUDA-only paths."""

from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch

from mimkd.bench import timing as bench
from mimkd.bench.build import calibrated_teacher
from mimkd.bench.report import (
    derive,
    format_markdown,
    method_options,
    parse_input_shape,
    resolve_methods,
    write_report,
)
from mimkd.bench.timing import (
    STUDENT_ROW,
    TEACHER_ROW,
    BenchSetup,
    benchmark,
    find_max_batch,
    is_oom,
    run_row,
    run_row_isolated,
)
from mimkd.errors import ConfigError, MethodError, NonFiniteLossError
from mimkd.evaluation.flops import count_flops
from mimkd.models import build_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BATCH = 8


def _setup(**kw) -> BenchSetup:
    """The demo pair on Fashion-MNIST-shaped input, tiny: batch 8, 2 timed steps, a 256-row bank."""
    base = dict(
        teacher="cnn_teacher",
        student="conv4mp_w32",
        input_shape=(1, 28, 28),
        num_classes=10,
        num_train=256,
        batch_size=BATCH,
        steps=2,
        warmup=1,
        threads=2,
        options={"crd": {"num_negatives": 64}},
        ceiling_n=256,
    )
    return BenchSetup(**{**base, **kw})


@pytest.fixture(scope="module")
def report() -> dict:
    """One in-process benchmark of the student, the teacher, kd and crd, with the derived columns."""
    r = benchmark(_setup(), ["kd", "crd"], isolate=False)
    return derive(r)


def test_rows_present_and_rates_positive(report):
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == [STUDENT_ROW, TEACHER_ROW, "kd", "crd"]
    for r in rows.values():
        assert "error" not in r, r
        assert r["batch"] == BATCH and r["steps_timed"] == 2
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["images_per_s_q1"] <= r["images_per_s"] <= r["images_per_s_q3"]
        assert r["ms_per_step"] > 0 and r["gflops_per_s"] > 0 and r["pct_of_ceiling"] > 0
        assert r["projected_minutes"] == pytest.approx(240 * 50000 / r["images_per_s"] / 60)
        assert r["peak_mem_mib"] is None  # in-process CPU rows share one process: no honest peak
    assert rows["kd"]["vs_kd"] == pytest.approx(1.0)
    assert rows["crd"]["method_params"] > 0 and rows["kd"]["method_params"] == 0
    assert rows[TEACHER_ROW]["trainable_params"] == 0
    assert report["header"]["matmul_ceiling"]["gflops"] > 0 and report["header"]["threads"] == 2
    assert len(report["header"]["load_avg_start"]) == 3 and len(report["header"]["load_avg_end"]) == 3


def test_flops_match_the_forward_count(report):
    """torch counts forward + backward; the first convolution's input needs no gradient, so a step is a bit
    under 3 forwards. The teacher forward is exactly count_flops, and KD = student step + teacher forward."""
    rows = {r["row"]: r for r in report["rows"]}
    x1, x3 = torch.randn(BATCH, 1, 28, 28), torch.randn(BATCH, 1, 28, 28)
    student_fwd = count_flops(build_model("conv4mp_w32", num_classes=10, in_channels=1), x1) / BATCH
    teacher_fwd = count_flops(build_model("cnn_teacher", num_classes=10, in_channels=1), x3) / BATCH
    assert 2.7 * student_fwd <= rows[STUDENT_ROW]["flops_per_image"] <= 3.0 * student_fwd
    assert rows[TEACHER_ROW]["flops_per_image"] == pytest.approx(teacher_fwd)
    assert rows["kd"]["flops_per_image"] == pytest.approx(
        rows[STUDENT_ROW]["flops_per_image"] + rows[TEACHER_ROW]["flops_per_image"]
    )


def test_report_files_parse(report, tmp_path):
    md, js = write_report(report, tmp_path / "sub" / "bench_x")
    assert md.name == "bench_x.md" and js.name == "bench_x.json"
    back = json.loads(js.read_text())
    assert [r["row"] for r in back["rows"]] == [r["row"] for r in report["rows"]]
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in table}
    assert len(widths) == 1  # header, separator and rows have the same number of cells
    assert len(table) == 2 + 4
    for name in (STUDENT_ROW, TEACHER_ROW, "| kd |", "| crd |", "Matmul ceiling", "Load average"):
        assert name in text
    assert format_markdown(back) == text  # the JSON holds everything the table shows


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(MethodError) as e:
        resolve_methods("kd,crdd")
    assert "'crdd'" in str(e.value) and "crd" in str(e.value) and "Valid methods" in str(e.value)
    every = resolve_methods("all")
    assert every[0] == "kd" and "vanilla" not in every and {"mimkd", "dcm", "kdep"} <= set(every)
    assert resolve_methods("kd, crd,kd") == ["kd", "crd"]


def test_method_options_resolution():
    assert method_options(["mimkd.critic_width=32"], ["kd", "mimkd"]) == {"mimkd": {"critic_width": 32}}
    assert method_options(["method.critic_width=16"], ["kd", "mimkd"]) == {"mimkd": {"critic_width": 16}}
    with pytest.raises(ConfigError, match="no benchmarked method"):
        method_options(["method.nonsense=1"], ["kd"])
    with pytest.raises(ConfigError, match="not benchmarked"):
        method_options(["mimkd.critic_width=32"], ["kd"])
    with pytest.raises(ConfigError):
        method_options(["mimkd.critic_width=-1"], ["mimkd"])  # the method's own validation
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    with pytest.raises(ConfigError, match="CxHxW"):
        parse_input_shape("32x32")


def test_isolated_row_reports_its_peak_rss():
    r = run_row_isolated(_setup(steps=1), STUDENT_ROW)
    assert "error" not in r, r
    assert r["peak_mem_kind"] == "cpu peak RSS"
    assert r["peak_mem_mib"] >= r["base_rss_mib"] > 0


def test_row_subprocess_reports_errors_as_a_row(monkeypatch, capsys):
    """The subprocess entry point, run in this process: a row that cannot be built comes back as an error."""
    from dataclasses import asdict

    payload = json.dumps(
        {"setup": asdict(_setup(student="no_such_model")), "row": STUDENT_ROW, "batch": None}
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(payload))
    bench._child_main()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(bench._CHILD_MARK)
    bad = json.loads(line[len(bench._CHILD_MARK) :])
    assert bad["row"] == STUDENT_ROW and "no_such_model" in bad["error"]


def test_mimkd_bench_command_writes_both_files(tmp_path, capsys):
    from mimkd.cli import main

    out = tmp_path / "b"
    argv = ["bench", "--teacher", "cnn_teacher", "--student", "conv4mp_w32", "--input-shape", "1x28x28"]
    argv += ["--num-classes", "10", "--num-train", "64", "--methods", "kd", "--batch-size", "4"]
    argv += ["--steps", "1", "--warmup", "1", "--device", "cpu", "--no-isolate", "--out", str(out)]
    argv += ["--ceiling-size", "256"]
    assert main(argv) == 0
    assert "| kd |" in capsys.readouterr().out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["setup"]["input_shape"] == [1, 28, 28] and data["setup"]["num_train"] == 64
    assert (tmp_path / "b.md").read_text().count("| kd |") == 1
    omp = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    assert data["header"]["openmp"] == omp and ", OpenMP " in (tmp_path / "b.md").read_text()
    assert main(["bench", "--teacher", "t", "--student", "s", "--methods", "kdd", "--device", "cpu"]) == 2
    assert "Valid methods" in capsys.readouterr().err


def test_max_batch_search_doubles_until_it_does_not_fit():
    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= 300

    assert find_max_batch(fits, 64, 32768) == 256 and tried == [64, 128, 256, 512]
    assert find_max_batch(lambda b: True, 64, 200) == 128  # the limit caps the search
    assert find_max_batch(lambda b: False, 64, 1024) is None
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory")) and not is_oom(ValueError("bad shape"))


def test_fits_turns_an_out_of_memory_step_into_false(monkeypatch):
    """The OOM branch of the batch search, driven without a GPU by a step that raises CUDA's OOM error."""

    def fake_build(s, row, batch, dev):
        def step():
            if batch > 100:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

        return step, {"check": lambda: None}

    monkeypatch.setattr(bench, "build_row", fake_build)
    assert bench._fits(_setup(), "kd", 64) and not bench._fits(_setup(), "kd", 128)
    monkeypatch.setattr(bench, "build_row", lambda *a: (lambda: (_ for _ in ()).throw(ValueError("bug")), {}))
    with pytest.raises(ValueError):  # anything but OOM is not swallowed
        bench._fits(_setup(), "kd", 64)


def test_max_batch_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="cuda"):
        benchmark(_setup(), ["kd"], max_batch=True)


@needs_cuda
def test_cuda_rows_report_allocated_memory_and_max_batch():
    s = _setup(device="cuda", ceiling_n=1024)
    r = run_row(s, "kd")
    assert r["peak_mem_kind"] == "cuda max_memory_allocated" and r["peak_mem_mib"] > 0
    rep = benchmark(s, ["kd"], max_batch=True, max_batch_limit=32)
    assert all(row["batch"] == 32 for row in rep["rows"]), rep["rows"]
    assert rep["header"]["matmul_ceiling"]["gflops"] > 0 and "allow_tf32" in rep["header"]["matmul_ceiling"]


def test_untrained_teacher_gets_calibrated_batchnorm_statistics():
    """An untrained teacher in eval mode would normalise with mean 0 / variance 1 and blow up feature losses
    (CC overflowed within 3 steps on resnet32x4); the benchmark's teacher has statistics from the batch."""
    s = _setup()
    x = torch.randn(16, 1, 28, 28)
    t = calibrated_teacher(s, x)
    bns = [m for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not t.training
    assert all(m.momentum == 0.1 for m in bns)  # restored after the cumulative calibration
    assert any(float(m.running_mean.abs().max()) > 0 for m in bns)


def test_a_non_finite_loss_makes_the_row_an_error(monkeypatch):
    """The trainer's TrainStep refuses a non-finite step; the benchmark reports the row, untimed."""
    import mimkd.distillers

    real = mimkd.distillers.build_distiller

    def poisoned(*args, **kwargs):
        d = real(*args, **kwargs)
        with torch.no_grad():
            next(d.student.parameters()).fill_(float("nan"))
        return d

    monkeypatch.setattr(mimkd.distillers, "build_distiller", poisoned)
    with pytest.raises(NonFiniteLossError, match="kd: non-finite loss"):
        run_row(_setup(steps=1), "kd")
    rep = benchmark(_setup(steps=1), ["kd"], isolate=False)
    assert "non-finite" in next(r for r in rep["rows"] if r["row"] == "kd")["error"]


def test_bf16_precision_runs_and_measures_a_bf16_ceiling():
    r = run_row(_setup(precision="bf16", steps=1), "kd")
    assert r["images_per_s"] > 0 and r["row_ceiling_gflops"] > 0
    assert bench.matmul_ceiling("cpu", 128, reps=1, precision="bf16")["dtype"] == "bfloat16"


def test_rounds_keep_each_rows_fastest_round(monkeypatch):
    """Rows are measured round-robin; the fastest round is reported, every round's median kept; a row that
    failed is not tried again."""
    calls: list[str] = []
    speeds = iter([10.0, 5.0, 30.0, 20.0, 8.0, 25.0])

    def fake_row(s, row, batch=None):
        calls.append(row)
        if row == "crd":
            raise RuntimeError("unfit")
        return {"row": row, "images_per_s": next(speeds), "round": calls.count(row)}

    monkeypatch.setattr(bench, "run_row", fake_row)
    rep = benchmark(_setup(), ["kd", "crd"], isolate=False, rounds=2)
    assert calls == [STUDENT_ROW, TEACHER_ROW, "kd", "crd", STUDENT_ROW, TEACHER_ROW, "kd"]
    rows = {r["row"]: r for r in rep["rows"]}
    assert rows[STUDENT_ROW]["images_per_s"] == 20.0 and rows[STUDENT_ROW]["round"] == 2
    assert rows[STUDENT_ROW]["round_images_per_s"] == [10.0, 20.0]
    assert rows[TEACHER_ROW]["images_per_s"] == 8.0 and rows["kd"]["images_per_s"] == 30.0
    assert rows["kd"]["round_images_per_s"] == [30.0, 25.0]
    assert rows["crd"]["error"] == "RuntimeError: unfit" and rep["header"]["rounds"] == 2
