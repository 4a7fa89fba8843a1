"""The real ``scripts/setup.sh``, both ways (the README's two commands), in a temporary copy of the repo.

No mocks: the script runs as a user runs it, with ``MIMKD_SETUP_APT=0`` so it never calls apt-get. So that
it does not download torch, the copy's ``.venv`` is made beforehand and sees this venv's packages (torch
2.13.0 included) through a directory of symlinks named in a ``.pth`` file — every entry except this venv's
own mimkd install (and pip/setuptools, which the new venv has itself). Those packages lie outside the new
venv, so its pip counts them as installed but never uninstalls them ("Not uninstalling ... outside
environment"); the test checks that before running the script. pip still fetches setuptools for the
isolated build of the editable install, as it does for a user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup.sh"

# entries of this venv's site-packages the copy's venv must not see: this venv's mimkd install (it would
# import the checkout under test instead of the copy), and pip/setuptools (the new venv has its own)
_HIDDEN_PREFIXES = (
    "mimkd",
    "__editable__",
    "_mimkd",
    "pip",
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
)
_HIDDEN_NAMES = {"distutils-precedence.pth", "__pycache__"}


def _tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: {r.stderr.strip()}")
    return [f for f in r.stdout.split("\0") if f]


def _copy_repo(dest: Path) -> Path:
    for rel in _tracked_files():
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    return dest


def _site_packages(venv: Path) -> Path:
    v = sys.version_info
    return venv / "lib" / f"python{v.major}.{v.minor}" / "site-packages"


def _make_venv(repo: Path, shared: Path) -> Path:
    """``repo/.venv`` from the base interpreter, seeing this venv's packages but not its mimkd."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(repo / ".venv")], check=True, capture_output=True)
    here = Path(sysconfig.get_paths()["purelib"])
    shared.mkdir()
    for entry in here.iterdir():
        if entry.name.startswith(_HIDDEN_PREFIXES) or entry.name in _HIDDEN_NAMES:
            continue
        (shared / entry.name).symlink_to(entry)
    site = _site_packages(repo / ".venv")
    assert site.is_dir(), f"no {site}"
    (site / "_mimkd_test_shared.pth").write_text(f"{shared}\n")
    return repo / ".venv" / "bin" / "python"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(MIMKD_SETUP_APT="0", PYTHONNOUSERSITE="1")
    return env


def _setup(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/setup.sh", *args],
        cwd=repo,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _skip_if_offline(r: subprocess.CompletedProcess[str]) -> None:
    """pip's isolated build fetches setuptools from the package index: without one the test cannot run."""
    if (
        r.returncode != 0
        and "setuptools>=68" in r.stderr
        and ("No matching distribution" in r.stderr or "Could not find a version" in r.stderr)
    ):
        pytest.skip("pip could not fetch setuptools>=68 for the isolated build (no package index reachable)")


def _out(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def _py(python: Path, code: str) -> str:
    r = subprocess.run([str(python), "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, _out(r)
    return r.stdout.strip()


def test_setup_script_both_ways_in_a_copy_of_the_repository(tmp_path):
    here = Path(sysconfig.get_paths()["purelib"])  # this venv's site-packages
    before = sorted(p.name for p in here.iterdir())
    repo = _copy_repo(tmp_path / "repo")
    vpy = _make_venv(repo, tmp_path / "shared")
    venv = repo / ".venv"

    # Safety: pip in the copy's venv sees this venv's packages but counts none of them as its own, so it
    # can never uninstall (delete through the symlinks) anything of this venv.
    def pip_list(*flags: str) -> set[str]:
        r = subprocess.run(
            [str(vpy), "-m", "pip", "list", "--format=freeze", *flags],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, _out(r)
        return {line.split("==")[0].lower() for line in r.stdout.splitlines()}

    assert "torch" in pip_list() and "mimkd" not in pip_list()
    assert pip_list("--local") <= {"pip", "setuptools"}, "pip would count a package of this venv as its own"
    # the script would otherwise download torch (GBs): it is installed once it imports as 2.13.0
    torch_version = _py(vpy, "import torch; print(torch.__version__)")
    if not torch_version.startswith("2.13.0"):
        pytest.skip(f"this venv has torch {torch_version}, not 2.13.0: setup.sh would download torch")
    mimkd_absent = subprocess.run([str(vpy), "-c", "import mimkd"], env=_env(), capture_output=True)
    assert mimkd_absent.returncode != 0, "the copy's venv imports a mimkd before setup.sh installs it"

    # the README's first command, set-up part: no --dev
    r = _setup(repo)
    _skip_if_offline(r)
    assert r.returncode == 0, _out(r)
    assert "[setup] installing mimkd and its dependencies" in r.stdout, _out(r)
    assert "installing torch" not in r.stdout, _out(r)
    assert "[setup] ready: mimkd" in r.stdout, _out(r)
    assert (venv / ".mimkd-installed").is_file()
    assert not (venv / ".mimkd-installed-dev").exists()
    where = Path(_py(vpy, "import mimkd; print(mimkd.__file__)")).resolve()
    assert where.is_relative_to(repo.resolve()), f"mimkd imported from {where}, not from the copy {repo}"
    h = subprocess.run([str(venv / "bin" / "mimkd"), "--help"], env=_env(), capture_output=True, text=True)
    assert h.returncode == 0 and "demo" in h.stdout, _out(h)

    # idempotent: a second run installs nothing
    r = _setup(repo)
    assert r.returncode == 0, _out(r)
    assert "installing" not in r.stdout, _out(r)
    assert "[setup] ready: mimkd" in r.stdout, _out(r)

    # the README's second command, set-up part: --dev installs the dev flavour over the plain one
    r = _setup(repo, "--dev")
    assert r.returncode == 0, _out(r)
    assert "[setup] installing mimkd[dev] and its dependencies" in r.stdout, _out(r)
    assert (venv / ".mimkd-installed-dev").is_file() and (venv / ".mimkd-installed").is_file()
    where = Path(_py(vpy, "import mimkd; print(mimkd.__file__)")).resolve()
    assert where.is_relative_to(repo.resolve()), f"mimkd imported from {where}, not from the copy {repo}"

    # and a --dev install satisfies the plain set-up, both then idempotent
    for args in ((), ("--dev",)):
        r = _setup(repo, *args)
        assert r.returncode == 0, _out(r)
        assert "installing" not in r.stdout, _out(r)

    # nothing of this venv was touched
    assert sorted(p.name for p in here.iterdir()) == before


def test_setup_script_refuses_an_unknown_argument(tmp_path):
    # the argument is checked before anything else happens: a copy of the script alone is enough
    (tmp_path / "scripts").mkdir()
    shutil.copy2(SCRIPT, tmp_path / "scripts" / "setup.sh")
    r = _setup(tmp_path, "--bogus")
    assert r.returncode == 2, _out(r)
    assert r.stdout == "", _out(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[setup] error: unknown argument '--bogus'"), _out(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scripts"], "setup.sh --bogus created files"

    h = _setup(tmp_path, "--help")
    assert h.returncode == 0 and "Usage: bash scripts/setup.sh [--dev]" in h.stdout, _out(h)
