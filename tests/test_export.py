"""``mimkd export``: the student alone as safetensors, TorchScript and ONNX, checked on real test images."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import yaml

from mimkd.checkpoint import load_checkpoint, load_weights
from mimkd.cli import main
from mimkd.data import eval_batches, load_dataset
from mimkd.evaluation import count_parameters
from mimkd.models import build_network

from helpers import SMALL_RUN, needs_fmnist, run_cli

pytestmark = [
    needs_fmnist,
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]

IMPORTS = {"safetensors": ["safetensors"], "torchscript": [], "onnx": ["onnx", "onnxruntime"]}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real one-epoch conv4mp_w32 run on 2 % of Fashion-MNIST."""
    out = tmp_path_factory.mktemp("export_train")
    run_cli("train", "--model", "conv4mp_w32", *SMALL_RUN, "--epochs", "1", "--out", str(out), "--name", "r")
    return out / "r"


@pytest.fixture(scope="module")
def dcm_run(tmp_path_factory):
    """A short DCM cohort run: the checkpoint also holds the method's auxiliary heads; net2 is a peer."""
    out = tmp_path_factory.mktemp("export_dcm")
    run_cli(
        "distill", "--method", "dcm", "--student", "conv4mp_w32", *SMALL_RUN, "--epochs", "1",
        "--set", "train.max_steps_per_epoch=5", "--out", str(out), "--name", "d",
    )  # fmt: skip
    for name in ("best.pt", "best_net2.pt", "config.yaml"):
        assert (out / "d" / name).is_file(), name
    return out / "d"


def _student(ckpt):
    ck = load_checkpoint(ckpt)
    net = build_network(ck["arch"], ck["num_classes"], ck["in_channels"])
    load_weights(net, ckpt, ck["arch"])
    return net.eval()


def _test_images(n: int = 16) -> torch.Tensor:
    test = load_dataset("fashion_mnist", split="test")
    # images the export's own check did not see (it uses the first 16)
    return next(eval_batches(test.subset(torch.arange(100, 100 + n)), n, with_labels=False)).images.float()


def _tensors(obj) -> int:
    """Number of tensor elements anywhere in a nested checkpoint entry."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors(v) for v in obj)
    return 0


def _reload(fmt: str, path):
    """A callable images -> logits from the artefact alone (no mimkd checkpoint involved)."""
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        net = build_network(meta["arch"], int(meta["num_classes"]), int(meta["in_channels"]))
        net.load_state_dict(load_file(str(path)), strict=True)
        net.eval()
        return lambda x: net(x)
    if fmt == "torchscript":
        mod = torch.jit.load(str(path)).eval()
        return lambda x: mod(x)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_export_each_format_reproduces_student(trained_run, tmp_path, fmt):
    for mod in IMPORTS[fmt]:
        pytest.importorskip(mod)
    out = tmp_path / f"student.{fmt}"
    proc = run_cli("export", str(trained_run), "--format", fmt, "--out", str(out))
    assert out.is_file() and out.stat().st_size > 0
    assert "16 test images of fashion_mnist" in proc.stdout and "max abs difference" in proc.stdout
    assert "best.pt" in proc.stdout and "28,522 parameters" in proc.stdout
    student = _student(trained_run / "best.pt")
    x = _test_images(5)  # another batch size than the export's 16: the batch axis is dynamic
    with torch.no_grad():
        ref, got = student(x), _reload(fmt, out)(x)
    assert got.shape == (5, 10)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(out))
        assert set(sd) == set(student.state_dict())
    if fmt == "torchscript":
        assert sum(p.numel() for p in torch.jit.load(str(out)).parameters()) == count_parameters(student)


def test_default_output_path_and_last(trained_run):
    pytest.importorskip("safetensors")
    assert main(["export", str(trained_run), "--format", "safetensors", "--which", "last"]) == 0
    assert (trained_run / "export" / "last.safetensors").is_file()


def test_distilled_run_exports_student_only(dcm_run, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    ck = load_checkpoint(dcm_run / "best.pt")
    assert _tensors(ck.get("method_state")) > 0  # the run has extra parts (auxiliary heads)
    student = _student(dcm_run / "best.pt")
    out = tmp_path / "s.safetensors"
    assert main(["export", str(dcm_run), "--format", "safetensors", "--out", str(out)]) == 0
    sd = load_file(str(out))
    assert set(sd) == set(student.state_dict())
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in student.state_dict().values())
    assert sum(v.numel() for k, v in sd.items() if k in dict(student.named_parameters())) == count_parameters(
        student
    )
    ts = tmp_path / "s.pt"
    assert main(["export", str(dcm_run), "--format", "torchscript", "--out", str(ts)]) == 0
    assert sum(p.numel() for p in torch.jit.load(str(ts)).parameters()) == count_parameters(student)

    # --network net2: the peer from best_net2.pt, not the student
    out2 = tmp_path / "net2.safetensors"
    assert (
        main(["export", str(dcm_run), "--format", "safetensors", "--network", "net2", "--out", str(out2)])
        == 0
    )
    peer = _student(dcm_run / "best_net2.pt")
    x = _test_images(8)
    with torch.no_grad():
        torch.testing.assert_close(_reload("safetensors", out2)(x), peer(x), atol=0, rtol=0)
        assert not torch.equal(peer(x), student(x))


def test_errors(trained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--format", "torchscript"]) == 2
    assert "has no best.pt or last.pt" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        main(["export", str(trained_run), "--format", "tflite"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(blocker / "m.pt")]) == 2
    assert "cannot create directory" in capsys.readouterr().err

    bare = tmp_path / "bare.pt"
    torch.save({"model": _student(trained_run / "best.pt").state_dict()}, bare)
    assert main(["export", str(bare), "--format", "torchscript"]) == 2
    assert "does not record its architecture" in capsys.readouterr().err

    assert main(["export", str(trained_run), "--format", "torchscript", "--network", "net2"]) == 2
    assert "no best_net2.pt" in capsys.readouterr().err

    assert main(["export", str(bare), "--format", "torchscript", "--which", "last"]) == 2
    assert "only apply to a run directory" in capsys.readouterr().err


def test_missing_package_names_pip_command(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    assert main(["export", str(trained_run), "--format", "safetensors", "--out", str(tmp_path / "m")]) == 2
    assert "pip install safetensors" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install onnx onnxruntime" in capsys.readouterr().err


def test_moved_data_falls_back_to_random_batch(trained_run, tmp_path, capsys):
    run = tmp_path / "moved"
    run.mkdir()
    shutil.copy(trained_run / "best.pt", run / "best.pt")
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "gone")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    cap = capsys.readouterr()
    assert "warning" in cap.err and "random batch" in cap.err
    assert "random 1x28x28 inputs" in cap.out


def test_export_records_the_input_normalisation_a_deployer_needs(trained_run, tmp_path):
    """The metadata's mean/std turn raw pixels into exactly the inputs the student was trained and tested
    on; the checkpoint records them too, and the CLI prints them."""
    pytest.importorskip("safetensors")
    import json

    from safetensors import safe_open

    out = tmp_path / "s.safetensors"
    proc = run_cli("export", str(trained_run), "--format", "safetensors", "--out", str(out))
    assert "input: 1×28×28, x = (pixels / 255 - mean) / std" in proc.stdout
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    shape, mean, std = (json.loads(meta[k]) for k in ("input_shape", "mean", "std"))
    assert shape == [1, 28, 28]
    assert load_checkpoint(trained_run / "best.pt")["input"]["mean"] == mean
    raw = load_dataset("fashion_mnist", split="test").images[100:105].float() / 255
    x = (raw - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(x, _test_images(5))
