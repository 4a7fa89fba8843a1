"""The teacher's identity: what a run was distilled from, recorded so a resume cannot switch teachers.

Every checkpoint and ``summary.json`` of a run with a teacher holds ``teacher_identity``: the architecture,
the checkpoint path, the sha256 of that file and the sha256 of the weights themselves (every state_dict
entry's name, dtype, shape and bytes, in key order; also defined for a teacher built in memory). ``--resume``
and a sweep's read-back of a finished run compare the weights hash and refuse a different teacher, naming
both hashes. See ``docs/reliability.md``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "file_sha256",
    "weights_sha256",
    "teacher_identity",
    "file_identity",
    "identity_mismatch",
    "changed_teacher",
    "short",
]

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(net: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 of a network's state_dict (or of a state_dict): every entry's name, dtype, shape and bytes,
    sorted by name."""
    h = hashlib.sha256()
    sd = net.state_dict() if isinstance(net, nn.Module) else net
    for name, t in sorted(sd.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_identity(
    teacher: nn.Module, arch: str | None = None, checkpoint: str | Path | None = None
) -> dict[str, Any]:
    """The identity record of ``teacher`` (loaded from ``checkpoint`` when given)."""
    ident: dict[str, Any] = {"arch": arch, "weights_sha256": weights_sha256(teacher)}
    if checkpoint is not None and Path(checkpoint).is_file():
        ident["checkpoint"] = str(checkpoint)
        ident["file_sha256"] = file_sha256(checkpoint)
    return ident


def short(digest: str | None) -> str:
    return (digest or "?")[:12]


def identity_mismatch(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """A sentence saying how the teacher changed, or None when it is the same (or nothing was recorded).

    The weights decide; a teacher file re-saved with the same weights is the same teacher."""
    if not recorded or not current:
        return None
    a, b = recorded.get("weights_sha256"), current.get("weights_sha256")
    if a is None or b is None or a == b:
        return None
    where = current.get("checkpoint") or recorded.get("checkpoint") or "the teacher"
    files = ""
    if recorded.get("file_sha256") and current.get("file_sha256"):
        files = f"; file sha256 {short(recorded['file_sha256'])} then, {short(current['file_sha256'])} now"
    return (
        f"the teacher changed: the run was distilled from weights sha256 {short(a)}, {where} now holds "
        f"weights sha256 {short(b)}{files}"
    )


def file_identity(path: str | Path, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of the teacher checkpoint at ``path``. When its bytes match ``recorded``'s file hash the
    recorded weights hash is reused; otherwise the weights are loaded and hashed."""
    from mimkd.checkpoint import extract_state_dict, load_checkpoint

    digest = file_sha256(path)
    ident: dict[str, Any] = {"checkpoint": str(path), "file_sha256": digest}
    if recorded and recorded.get("file_sha256") == digest and recorded.get("weights_sha256"):
        ident["weights_sha256"] = recorded["weights_sha256"]
    else:
        ident["weights_sha256"] = weights_sha256(extract_state_dict(load_checkpoint(path), str(path)))
    return ident


def changed_teacher(summary: dict[str, Any], teacher_checkpoint: str | None) -> str | None:
    """For a finished run's ``summary``: how the teacher at ``teacher_checkpoint`` differs from the one the
    run was distilled from (None when the same, or when either is unknown)."""
    recorded = summary.get("teacher_identity")
    if not recorded or not teacher_checkpoint or not Path(teacher_checkpoint).is_file():
        return None
    return identity_mismatch(recorded, file_identity(teacher_checkpoint, recorded))
