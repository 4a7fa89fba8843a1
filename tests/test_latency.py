"""Single-input CPU latency: the measurement, its side effects, and the `mimkd latency` command."""

from __future__ import annotations

import json

import torch

from mimkd.evaluation import latency_profile, measure_latency
from mimkd.models import build_model

from helpers import run_cli


def test_measure_latency_leaves_model_and_threads_untouched():
    net = build_model("conv4mp_w32", num_classes=10, in_channels=1).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    r = measure_latency(net, (1, 28, 28), threads=1, runs=7, warmup=1)
    assert r["runs"] == 7 and r["batch"] == 1 and r["threads"] == 1
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert torch.get_num_threads() == threads  # restored
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not consumed (seeded runs stay seeded)
    assert net.training  # measured on an eval-mode copy
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics untouched


def test_latency_profile_has_both_thread_settings():
    net = build_model("conv4mp_w32", num_classes=10, in_channels=1)
    prof = latency_profile(net, (1, 28, 28), runs=5, warmup=1)
    assert prof["1_thread"]["threads"] == 1
    assert prof["all_threads"]["threads"] == max(1, torch.get_num_threads())


def test_latency_command_json_and_unknown_model():
    p = run_cli("latency", "conv4mp_w32", "resnet8", "--data", "fashion_mnist", "--runs", "5", "--json")
    out = json.loads(p.stdout)
    assert out["input"] == [1, 1, 28, 28]
    assert [r["model"] for r in out["rows"]] == ["conv4mp_w32", "resnet8"]
    assert out["rows"][0]["params"] == 28522 and out["rows"][0]["flops"] > 0
    assert all(r["ms_1_thread"] > 0 and r["ms_all_threads"] > 0 for r in out["rows"])
    p = run_cli("latency", "resnet8x", check=False)
    assert p.returncode == 2 and "resnet8x4" in p.stderr and "Traceback" not in p.stderr


def test_latency_of_a_hooked_student_measures_the_bare_network():
    """A distiller's FeatureTap hooks stay on the student; the latency copy drops them (they would fail under
    inference mode) and the original keeps them."""
    import mimkd

    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet20", num_classes=10)
    d = mimkd.build_distiller("at", student, teacher, torch.randn(4, 3, 32, 32), num_classes=10)
    hooked = sum(len(m._forward_hooks) for m in student.modules())
    assert hooked > 0
    r = measure_latency(d.student, (3, 32, 32), threads=1, runs=3, warmup=1)
    assert r["median_ms"] > 0
    assert sum(len(m._forward_hooks) for m in student.modules()) == hooked
