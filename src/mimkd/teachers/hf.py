"""Teachers in the Hugging Face Hub layout: ``--teacher PATH/TO/FOLDER`` and ``--teacher hf:ORG/REPO``.

A folder written by ``mimkd export RUN --format hf`` (``model.safetensors`` + ``config.json``,
:mod:`mimkd.evaluation.export_hf`) is converted once into a mimkd checkpoint
``$MIMKD_HOME/pretrained/hf/<hash>.pt`` (``{'model': state_dict, 'arch', 'num_classes', 'in_channels',
'input'}``, keyed by the hash of both files) so it loads through the ordinary teacher path, input check
included. ``hf:ORG/REPO[@REVISION]`` is downloaded by ``huggingface_hub`` into its own cache
(``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` only that cache is read (docs/teachers.md).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mimkd.errors import ConfigError, MimkdError

from .catalogue import cache_root

__all__ = ["is_hf_folder", "hf_snapshot", "hf_folder_checkpoint", "HUB_HINT"]

HUB_HINT = "pip install 'mimkd[hub]'"
_FILES = ["model.safetensors", "config.json", "README.md"]


def is_hf_folder(path: str | Path) -> bool:
    """A folder holding ``model.safetensors`` and ``config.json`` (and no run checkpoint)."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / "model.safetensors").is_file()
        and (p / "config.json").is_file()
        and not (p / "last.pt").is_file()
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_snapshot(spec: str) -> Path:
    """The local folder of ``hf:ORG/REPO[@REVISION]``: from the huggingface_hub cache, downloaded into it
    when missing (unless ``HF_HUB_OFFLINE`` is set). Every failure is one MimkdError line."""
    repo, _, revision = spec[len("hf:") :].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"--teacher {spec!r}: expected hf:ORG/REPO or hf:ORG/REPO@REVISION")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MimkdError(f"--teacher {spec}: needs the huggingface_hub package: {HUB_HINT}") from None
    offline = _offline()
    try:
        folder = snapshot_download(
            repo, revision=revision or None, allow_patterns=_FILES, local_files_only=offline
        )
    except Exception as e:  # the hub's errors: offline cache miss, unknown repo, network, HTTP
        text = " ".join(str(e).split())[:200] or type(e).__name__
        where = "is not in the huggingface_hub cache" if offline else "cannot be downloaded"
        raise MimkdError(
            f"--teacher {spec}: {repo} {where} ({type(e).__name__}: {text}); on a machine with network run "
            f"`hf download {repo}` (it fills HF_HUB_CACHE, which then works with HF_HUB_OFFLINE=1), or "
            "download the folder and pass --teacher PATH/TO/FOLDER"
        ) from None
    if not is_hf_folder(folder):
        raise MimkdError(f"--teacher {spec}: the repository holds no model.safetensors + config.json")
    return Path(folder)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def hf_folder_checkpoint(folder: str | Path, arch: str | None, label: str) -> tuple[str, str]:
    """``(checkpoint path, architecture)`` for a Hub-layout folder: the converted checkpoint in the cache
    (made on first use). ``arch``: the one asked for; a different one than the folder's is a ConfigError."""
    from mimkd.checkpoint import atomic_save
    from mimkd.evaluation.export_hf import read_hf_folder

    folder = Path(folder)
    sd, config = read_hf_folder(folder)
    recorded = config["architecture"]
    if arch is not None and arch != recorded:
        raise ConfigError(
            f"--teacher {label} is a {recorded!r} (its config.json), not {arch!r}: drop --teacher-arch or "
            f"pass --teacher-arch {recorded}"
        )
    out = cache_root() / "hf" / f"{_digest(folder)[:20]}.pt"
    if not out.is_file():
        inp = config.get("input") or {}
        ck = {"model": sd, "arch": recorded, "num_classes": int(config["num_classes"])}
        ck.update(in_channels=int(config["in_channels"]), source=label)
        if inp.get("height") and inp.get("mean"):
            shape = [int(inp["channels"]), int(inp["height"]), int(inp["width"])]
            ck["input"] = {"shape": shape, "mean": list(inp["mean"]), "std": list(inp["std"])}
            ck["input"]["data"] = config.get("dataset")
        atomic_save(ck, out)
    return str(out), recorded
