"""Checkpoints: atomic writes, exact-resume state, and imports of common third-party layouts.

A mimkd checkpoint is a dict whose ``"model"`` entry is the student's ``state_dict`` — the same layout as the
CIFAR teacher checkpoints that circulate (``{'model': state_dict}``), so any mimkd run can serve as a teacher
and any such file loads as one. Resume state (optimiser, RNG, position, method parts) sits beside it.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then renamed over the target:
a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mimkd.errors import CheckpointError, MimkdError

__all__ = [
    "atomic_save",
    "load_checkpoint",
    "extract_state_dict",
    "load_weights",
    "capture_rng",
    "restore_rng",
    "DiskFullError",
]

FORMAT = "mimkd-checkpoint"
VERSION = 1


class DiskFullError(MimkdError, OSError):
    """The disk filled up while a run wrote its files; what was written before is intact."""

    @staticmethod
    def is_full(e: BaseException) -> bool:
        return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)

    @classmethod
    def of(cls, e: OSError, where: str | Path, need_bytes: int | None = None) -> DiskFullError:
        """The one-line error for ``e`` while writing ``where`` (a file, or a run directory)."""
        where = Path(where)
        folder = where if where.is_dir() else where.parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        need = f"about {need_bytes / 2**20:.1f} MiB needed, " if need_bytes else ""
        return cls(
            f"the disk is full while writing {str(where)!r} ({need}{free}): free some space, then continue "
            "with --resume (the last complete checkpoint is intact)"
        )


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename + directory fsync).

    A full disk raises :class:`DiskFullError` (one line: the space needed and that ``--resume`` continues);
    the previous file at ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        need = _tensor_bytes(obj)
        if DiskFullError.is_full(e) or _is_full_write(e, path.parent, need):
            raise DiskFullError.of(e, path, need) from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _is_full_write(e: BaseException, folder: Path, need: int) -> bool:
    """torch.save reports a full disk as a RuntimeError from its zip writer ("file write failed"): such a
    failure with less free space than the checkpoint needs is a full disk."""
    if not (isinstance(e, RuntimeError) and "write failed" in str(e)):
        return False
    try:
        return shutil.disk_usage(folder).free < need + (1 << 20)
    except OSError:
        return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file; every failure becomes a CheckpointError naming the file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        for name in ("last.pt", "best.pt"):
            if (p / name).is_file():
                return load_checkpoint(p / name, map_location)
        raise CheckpointError(f"{str(p)!r} is a directory without last.pt or best.pt")
    try:
        with warnings.catch_warnings():  # garbage read as a pickle warns of an odd protocol first
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # a non-PyTorch file fails anywhere in the unpickler (IndexError, KeyError, ...)
        # The cause, short: torch's own text is mostly advice (load with weights_only=False, i.e. run the
        # file's code; file an issue), wrong for a corrupt file and unsafe. Keep the underlying error only.
        text = " ".join(str(e).split())
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].strip()
        text = text.split(". This is an internal miniz error", 1)[0]
        if "weights_only" in text or "Weights only" in text:
            text = ""
        cause = f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__
        if p.stat().st_size == 0:
            cause = "the file is empty"
        fix = "replace it with an intact copy"
        if p.name == "last.pt":  # a run's own checkpoint: what the user can do with that run
            fix = "start over with --overwrite"
            if (p.parent / "best.pt").is_file():
                fix += ", or use best.pt of the same run as a teacher or export source (the best student)"
        raise CheckpointError(
            f"cannot read checkpoint {str(p)!r} ({cause}): it is truncated, corrupt or not a PyTorch file; "
            + fix
        ) from None
    if isinstance(obj, nn.Module):
        obj = {"model": obj.state_dict()}
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(p)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def extract_state_dict(ckpt: dict[str, Any], path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the model weights in the layouts in circulation.

    Accepts ``{'model': sd}`` (RepDistiller, mimkd), ``{'state_dict': sd}``, ``{'net': sd}`` or a bare
    state_dict, and strips DataParallel's ``module.`` prefix.
    """
    sd: Any = None
    for key in ("model", "state_dict", "net", "model_state_dict"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    if sd is None and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    if sd is None:
        raise CheckpointError(
            f"{path}: no model weights found (looked for keys 'model', 'state_dict', 'net'; found "
            f"{sorted(ckpt)[:10]})"
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path: str | Path, arch: str = "") -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` strictly; a mismatch lists missing/unexpected keys and shape
    differences. Returns the checkpoint dict (for its metadata)."""
    ckpt = load_checkpoint(path)
    sd = extract_state_dict(ckpt, str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        what = f"architecture {arch!r}" if arch else type(model).__name__
        parts = [f"checkpoint {str(path)!r} does not match {what}:"]
        if missing:
            parts.append(
                f"  missing keys ({len(missing)}): {', '.join(missing[:12])}"
                + (" ..." if len(missing) > 12 else "")
            )
        if unexpected:
            parts.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                + (" ..." if len(unexpected) > 12 else "")
            )
        if shapes:
            parts.append(
                f"  shape mismatches ({len(shapes)}): "
                + "; ".join(shapes[:6])
                + (" ..." if len(shapes) > 6 else "")
            )
        hint = ckpt.get("arch")
        parts.append(
            f"  The checkpoint says it is a {hint!r}: pass that architecture."
            if isinstance(hint, str) and hint != arch
            else "  Check the architecture name (--teacher-arch) and the number of classes."
        )
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(sd, strict=True)
    return ckpt


def capture_rng(device: torch.device | str | None = None) -> dict[str, Any]:
    """Every RNG state a run touches: torch CPU, numpy, python, and the CUDA generator of ``device``.

    Only the training device's CUDA state is read (``"cuda_device"``): reading every visible GPU's state
    would create a CUDA context on each of them from every process of a multi-GPU run. With ``device=None``
    and CUDA available, every GPU's state is kept (``"cuda"``, the older layout).
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": _python_state_to_tensors(random.getstate()),
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(dev)
    elif dev is None and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what :func:`capture_rng` captured (the CUDA state onto ``device`` when it is a GPU)."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    if "python" in state:
        random.setstate(_python_state_from_tensors(state["python"]))
    dev = torch.device(device) if device is not None else None
    if "cuda_device" in state and dev is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], dev)
    elif "cuda" in state and torch.cuda.is_available():  # the older layout: every GPU's state
        if dev is None:
            torch.cuda.set_rng_state_all(state["cuda"])
        elif dev.type == "cuda" and dev.index is not None and dev.index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][dev.index], dev)


# weights_only=True loading accepts tensors and plain containers: store RNG states in that form.
def _numpy_state_to_tensors(st) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = st
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_tensors(d: dict[str, Any]):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_tensors(st) -> dict[str, Any]:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensors(d: dict[str, Any]):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])
