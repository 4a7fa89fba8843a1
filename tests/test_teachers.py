"""Teachers by name (docs/teachers.md): the catalogue, fetch from a real local HTTP server (Range resume,
checksums, trust on first use, one-line errors), verify, ``mimkd teachers list`` and ``--teacher NAME`` in a
real distill run."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mimkd.engine.setup import load_teacher
from mimkd.errors import ConfigError
from mimkd.models import build_model, build_network
from mimkd.teachers import TeacherFetchError, fetch, load_catalogue, resolve_teacher, verify
from mimkd.teachers.download import sha256_file
from test_export_hf import tiny_run_flags, write_cifar100

from helpers import run_cli

MEMBER = "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"


@dataclass
class Served:
    """What the test server holds (``cut_once``: bytes to send before closing, the next time only) and what it
    saw (the requests with their Range headers, the bytes sent)."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    cut_once: dict[str, int] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        s: Served = self.server.served  # type: ignore[attr-defined]
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        s.requests.append((name, rng))
        data = s.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = s.cut_once.pop(name, None)
        out = body if cut is None else body[:cut]
        self.wfile.write(out)
        s.sent[name] += len(out)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.served = Served()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.served, f"http://127.0.0.1:{httpd.server_port}/"  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    """MIMKD_HOME in a temp dir, the mirror URL at the local server; yields (served, env for the CLI)."""
    served, url = server
    env = {"MIMKD_HOME": str(tmp_path / "home"), "MIMKD_TEACHERS_URL": url}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MIMKD_TEACHERS_CATALOGUE", raising=False)
    return served, env


def repdistiller_tar(seed: int = 0) -> tuple[bytes, torch.nn.Module]:
    """mdistiller's cifar_teachers.tar layout holding a real resnet56 checkpoint in RepDistiller's format."""
    torch.manual_seed(seed)
    net = build_model("resnet56", num_classes=100)
    for m in net.modules():  # non-trivial BN statistics, so eval-mode logits depend on every buffer
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    torch.save({"epoch": 240, "model": net.state_dict(), "accuracy": torch.tensor(72.34)}, buf)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("cifar_teachers/README"))  # another (empty) member
        info = tarfile.TarInfo(MEMBER)
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    return out.getvalue(), net.eval()


def one_line(e: BaseException | str) -> str:
    text = str(e)
    assert "\n" not in text.strip(), text
    return text


def test_every_catalogue_entry_builds_in_the_zoo_with_its_published_output_shape():
    cat = load_catalogue()
    assert {t.namespace for t in cat.teachers.values()} == {"repdistiller", "torchvision"}
    assert len(cat.teachers) == 9
    for t in cat.teachers.values():
        net = build_network(t.arch, t.num_classes, t.input[0]).eval()
        with torch.no_grad():
            out = net(torch.zeros(1, *t.input))
        assert out.shape == (1, {"cifar100": 100, "imagenet": 1000}[t.dataset]), t.name
        assert t.top1 is not None and 60 < t.top1 < 80
        if t.namespace == "torchvision":
            assert t.file.startswith(t.arch + "-") and t.file[len(t.arch) + 1 : -4] == t.sha256_prefix
        else:
            assert (
                t.member == f"cifar_teachers/{t.arch}_vanilla/ckpt_epoch_240.pth"
                and t.file == "cifar_teachers.tar"
            )
    assert cat.sources["torchvision"]["base_url"] == "https://download.pytorch.org/models/"
    assert cat.sources["mdistiller"]["base_url"] == (
        "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/"
    )


def test_fetch_resumes_a_broken_transfer_with_a_range_request_and_loads_as_a_teacher(cache):
    served, _ = cache
    data, net = repdistiller_tar()
    served.files["cifar_teachers.tar"] = data
    cut = len(data) // 2
    served.cut_once["cifar_teachers.tar"] = cut
    cat = load_catalogue()
    t = cat.get("repdistiller:resnet56")
    with pytest.raises(TeacherFetchError) as e:
        fetch(t, cat)
    msg = one_line(e.value)
    assert f"after {cut:,} of {len(data):,} bytes" in msg and "fetching again resumes" in msg
    assert str(t.download_path) in msg and t.url in msg
    part = t.download_path.with_name(t.download_path.name + ".part")
    assert part.stat().st_size == cut and not t.download_path.exists() and not t.path.exists()
    path = fetch(t, cat)
    assert served.requests == [("cifar_teachers.tar", None), ("cifar_teachers.tar", f"bytes={cut}-")]
    assert served.sent["cifar_teachers.tar"] == len(data)  # cut bytes, then exactly the rest
    assert path == t.path and path.is_file() and not part.exists() and not t.download_path.exists()
    manifest = json.loads((t.path.parents[2] / "manifest.json").read_text())["files"]
    assert manifest["downloads/mdistiller/cifar_teachers.tar"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["repdistiller/resnet56/ckpt_epoch_240.pth"]["sha256"] == sha256_file(path)
    checkpoint, arch = resolve_teacher("repdistiller:resnet56", None)  # cached now: no request
    assert (checkpoint, arch) == (str(path), "resnet56") and len(served.requests) == 2
    teacher, _ = load_teacher(arch, checkpoint, 100, 3, input_shape=(3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher.eval()(x), net(x))


def test_a_changed_file_is_refused_after_the_first_download_recorded_its_checksum(cache):
    served, _ = cache
    served.files["cifar_teachers.tar"], _ = repdistiller_tar(seed=0)
    cat = load_catalogue()
    t = cat.get("repdistiller:resnet56")
    fetch(t, cat)
    t.path.unlink()
    served.files["cifar_teachers.tar"], _ = repdistiller_tar(seed=1)  # the server now has another file
    with pytest.raises(TeacherFetchError) as e:
        fetch(t, cat)
    msg = one_line(e.value)
    assert "recorded on the first download" in msg and "refused" in msg
    assert not t.path.exists() and not t.download_path.exists()
    assert not list(t.download_path.parent.glob("*.part"))


def test_a_corrupt_download_is_refused_by_the_sha256_prefix_and_nothing_is_left(cache):
    served, env = cache
    t = load_catalogue().get("torchvision:resnet18")
    served.files[t.file] = b"not the resnet18 weights " * 4000
    p = run_cli("teachers", "fetch", "torchvision:resnet18", check=False, env_extra=env)
    assert p.returncode == 2 and p.stderr.startswith("mimkd: error: ") and "Traceback" not in p.stderr
    msg = one_line(p.stderr)
    assert "sha256 prefix in the file name is f37072fd" in msg and str(t.path) in msg
    assert not t.path.exists() and not list(t.path.parent.glob("*"))


def test_network_errors_are_one_line_with_the_url_and_the_path_for_a_copy_by_hand(cache, monkeypatch):
    served, env = cache
    t = load_catalogue().get("torchvision:resnet34")
    p = run_cli("teachers", "fetch", "torchvision:resnet34", check=False, env_extra=env)  # not served
    assert p.returncode == 2
    msg = one_line(p.stderr)
    assert "404 Not Found" in msg and t.url in msg and f"put it at {t.path}" in msg
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MIMKD_TEACHERS_URL", f"mdistiller=http://127.0.0.1:{port}/mirror")
    cat = load_catalogue()
    t = cat.get("repdistiller:resnet56")
    assert t.url == f"http://127.0.0.1:{port}/mirror/cifar_teachers.tar"
    with pytest.raises(TeacherFetchError) as e:
        fetch(t, cat)
    msg = one_line(e.value)
    assert "connection was refused" in msg and str(t.download_path) in msg and "it unpacks" in msg
    # what the message says works offline: the archive put there by hand is checked and unpacked
    data, net = repdistiller_tar()
    t.download_path.parent.mkdir(parents=True, exist_ok=True)
    t.download_path.write_bytes(data)
    assert fetch(t, cat) == t.path and t.path.is_file() and not t.download_path.exists()


def test_full_sha256_from_an_extra_catalogue_and_verify(cache, tmp_path, monkeypatch):
    served, env = cache
    net = build_model("resnet8x4", num_classes=100)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict()}, buf)
    served.files["r8x4.pth"] = served.files["bad.pth"] = buf.getvalue()
    good = hashlib.sha256(buf.getvalue()).hexdigest()
    base = {"arch": "resnet8x4", "dataset": "cifar100", "num_classes": 100, "input": [3, 32, 32]}
    extra = {
        "sources": {"lab": {"base_url": "https://lab.example/teachers/"}},
        "teachers": {
            "lab:resnet8x4": {**base, "source": "lab", "file": "r8x4.pth", "sha256": good},
            "lab:bad": {**base, "source": "lab", "file": "bad.pth", "sha256": "0" * 64},
        },
    }
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    monkeypatch.setenv("MIMKD_TEACHERS_CATALOGUE", str(tmp_path / "extra.json"))
    env["MIMKD_TEACHERS_CATALOGUE"] = str(tmp_path / "extra.json")
    cat = load_catalogue()
    assert cat.get("lab:resnet8x4").url == env["MIMKD_TEACHERS_URL"] + "r8x4.pth"  # the mirror applies
    assert sha256_file(fetch(cat.get("lab:resnet8x4"), cat)) == good
    with pytest.raises(TeacherFetchError, match="the catalogue's sha256 is 0000000000000000"):
        fetch(cat.get("lab:bad"), cat)
    status = {c.name: c.status for c in verify(cat)}
    assert (
        status["lab:resnet8x4"] == "ok"
        and status["lab:bad"] == status["torchvision:resnet18"] == "not cached"
    )
    with open(cat.get("lab:resnet8x4").path, "ab") as f:
        f.write(b"x")
    p = run_cli("teachers", "verify", check=False, env_extra=env)
    assert p.returncode == 1 and re.search(r"^MISMATCH\s+lab:resnet8x4 ", p.stdout, re.M)
    with pytest.raises(ConfigError, match="Did you mean: lab:resnet8x4"):
        cat.get("lab:resnet8x")


def test_teachers_list_through_the_cli(cache):
    served, env = cache
    served.files["cifar_teachers.tar"], _ = repdistiller_tar()
    out = run_cli("teachers", "list", env_extra=env).stdout
    for name in load_catalogue().teachers:
        assert re.search(rf"^{re.escape(name)}\s.*\sno$", out, re.M), name
    assert re.search(r"^torchvision:resnet50\s+resnet50\s+imagenet\s+76\.13\s+97\.8 MB\s+no$", out, re.M)
    assert env["MIMKD_HOME"] in out
    fetched = run_cli("teachers", "fetch", "repdistiller:resnet56", "--no-progress", env_extra=env).stdout
    assert fetched.strip().endswith("repdistiller/resnet56/ckpt_epoch_240.pth")
    rows = {r["name"]: r for r in json.loads(run_cli("teachers", "list", "--json", env_extra=env).stdout)}
    assert (
        rows["repdistiller:resnet56"]["cached"] == "yes" and rows["repdistiller:resnet110"]["cached"] == "no"
    )


def test_distill_with_teacher_by_name_fetches_it_and_takes_the_catalogue_architecture(cache, tmp_path):
    served, env = cache
    served.files["cifar_teachers.tar"], _ = repdistiller_tar()
    flags = tiny_run_flags(write_cifar100(tmp_path / "data"), tmp_path / "runs")
    common = ["distill", "--teacher", "repdistiller:resnet56", "--student", "resnet8", "--method", "kd"]
    run_cli(*common, *flags, "--name", "kd", env_extra=env)
    run = tmp_path / "runs" / "kd"
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "finished" and s["teacher"] == "resnet56" and s["teacher_test_top1"] is not None
    cached = load_catalogue().get("repdistiller:resnet56").path
    assert s["teacher_identity"]["checkpoint"] == str(cached)
    assert "checkpoint: repdistiller:resnet56" in (run / "config.yaml").read_text()
    p = run_cli(*common, "--teacher-arch", "resnet110", *flags, "--name", "kd2", check=False, env_extra=env)
    assert p.returncode == 2
    assert "repdistiller:resnet56 is a 'resnet56' (the teacher catalogue), not 'resnet110'" in one_line(
        p.stderr
    )
    assert [r for r in served.requests] == [("cifar_teachers.tar", None)]  # fetched once, then cached
