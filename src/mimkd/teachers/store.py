"""The teacher cache: fetch (download, check, unpack), the checksum manifest, verify (docs/teachers.md).

Layout under ``$MIMKD_HOME/pretrained``: ``<namespace>/<name>/<file>`` the checkpoints, ``downloads/`` the
archives and the ``.part`` files of unfinished downloads, ``manifest.json`` the sha256 of every file fetched
(the trust-on-first-use record for sources that publish no checksum), ``.lock`` the lock.

A file reaches its final name only after its checksum passed: the full sha256 when the catalogue has it, the
8-hex prefix torchvision puts in its file names, else the one recorded on the first download (a later file
that differs is refused). Every failure is one :class:`TeacherFetchError` line with the URL and the path
where a file fetched by hand must go.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimkd.errors import MimkdError

from .catalogue import Catalogue, Teacher, cache_root
from .download import DownloadError, http_download, locked, sha256_file

__all__ = ["TeacherFetchError", "Manifest", "fetch", "verify", "cache_state", "Check"]


class TeacherFetchError(MimkdError):
    """A teacher could not be fetched or failed its checksum (one line, with what to do offline)."""


def _rel(path: Path) -> str:
    return path.relative_to(cache_root()).as_posix()


class Manifest:
    """``manifest.json``: ``{"files": {relative path: {"sha256", "size", "url", "recorded"}}}``."""

    def __init__(self) -> None:
        self.path = cache_root() / "manifest.json"
        try:
            data = json.loads(self.path.read_text())
            self.files: dict[str, dict[str, Any]] = dict(data.get("files", {}))
        except (OSError, ValueError, AttributeError):
            self.files = {}

    def recorded(self, path: Path) -> str | None:
        return (self.files.get(_rel(path)) or {}).get("sha256")

    def record(self, path: Path, sha256: str, url: str) -> None:
        """Record ``path``'s checksum and write the manifest atomically."""
        self.files[_rel(path)] = {
            "sha256": sha256,
            "size": path.stat().st_size if path.exists() else None,
            "url": url,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": "mimkd-teacher-cache", "version": 1, "files": self.files}, f, indent=1)
        os.replace(tmp, self.path)


def _expected(
    path: Path, manifest: Manifest, sha256: str | None, prefix: str | None
) -> tuple[str, str] | None:
    """(expected digest or prefix, where it comes from) for ``path``, or None when nothing is known."""
    if sha256:
        return sha256.lower(), "the catalogue's sha256"
    if prefix:
        return prefix.lower(), "the sha256 prefix in the file name"
    rec = manifest.recorded(path)
    if rec is None:
        return None
    return rec, f"the sha256 recorded on the first download ({_rel(path)} in {manifest.path})"


def _check(file: Path, final: Path, manifest: Manifest, sha256: str | None, prefix: str | None):
    """``(digest, refusal)`` for ``file`` (to become ``final``): ``refusal`` is the reason it does not match
    the checksum known for ``final``, or None."""
    digest = sha256_file(file)
    want = _expected(final, manifest, sha256, prefix)
    if want is not None and not digest.startswith(want[0]):
        return digest, f"its sha256 is {digest[:16]}..., {want[1]} is {want[0][:16]}..."
    return digest, None


@dataclass
class _Job:
    teacher: Teacher
    manifest: Manifest
    progress: bool | None = None

    def fail(self, reason: str) -> TeacherFetchError:
        t = self.teacher
        then = f" and run `mimkd teachers fetch {t.name}` again (it unpacks {t.member})" if t.member else ""
        text = (
            f"cannot fetch teacher {t.name}: {reason}; to fetch it by hand (offline, or from a mirror: "
            f"MIMKD_TEACHERS_URL), download {t.url} and put it at {t.download_path}{then}"
        )
        return TeacherFetchError(" ".join(text.split()))


def _accept(job: _Job, part: Path, final: Path, sha256: str | None, prefix: str | None) -> None:
    """Check ``part`` and rename it to ``final`` (recorded in the manifest); a mismatch deletes it."""
    digest, refusal = _check(part, final, job.manifest, sha256, prefix)
    if refusal:
        part.unlink()
        raise job.fail(
            f"the file received was refused: {refusal} (deleted: a corrupt transfer, or the server "
            "now has another file)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)
    job.manifest.record(final, digest, job.teacher.url)


def _download(job: _Job, final: Path, sha256: str | None, prefix: str | None) -> None:
    """Download (resuming a ``.part``) and accept the file at ``final``."""
    part = final.with_name(final.name + ".part")
    try:
        http_download(job.teacher.url, part, job.teacher.name, job.progress)
    except DownloadError as e:
        size = part.stat().st_size if part.exists() else 0
        kept = f" ({size:,} bytes kept in {part}: fetching again resumes)" if size else ""
        raise job.fail(f"{e}{kept}") from None
    _accept(job, part, final, sha256, prefix)


def _check_cached(job: _Job, path: Path, sha256: str | None, prefix: str | None) -> None:
    """A file already under its final name (fetched before, or put there by hand): check it; record it the
    first time."""
    digest, refusal = _check(path, path, job.manifest, sha256, prefix)
    if refusal:
        raise TeacherFetchError(
            f"the cached file {path} of teacher {job.teacher.name} was refused: {refusal}; delete it and run "
            f"`mimkd teachers fetch {job.teacher.name}` again"
        )
    if job.manifest.recorded(path) != digest:
        job.manifest.record(path, digest, job.teacher.url)


def _find_member(members: dict[str, tarfile.TarInfo], member: str) -> tarfile.TarInfo | None:
    """``member`` in the archive, or the one file ending in its last two path parts (another top folder)."""
    found = members.get(member) or members.get(f"./{member}")
    if found is not None:
        return found
    tail = "/" + "/".join(Path(member).parts[-2:])
    close = [m for n, m in members.items() if ("/" + n).endswith(tail)]
    return close[0] if len(close) == 1 else None


def _extract(job: _Job, tar: tarfile.TarFile, info: tarfile.TarInfo, t: Teacher) -> None:
    """Stream one member to a temporary file beside ``t.path``, check it, rename it."""
    t.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{t.path.name}.", suffix=".tmp", dir=t.path.parent)
    try:
        src = tar.extractfile(info)
        with os.fdopen(fd, "wb") as f:
            while src is not None and (block := src.read(1 << 20)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        _accept(_Job(t, job.manifest), Path(tmp), t.path, t.member_sha256, None)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _unpack(job: _Job, archive: Path, catalogue: Catalogue | None) -> None:
    """Unpack every catalogue entry the archive holds (the one asked for must be there), then delete it."""
    t = job.teacher
    wanted = catalogue.from_archive(t.source, t.file) if catalogue is not None else []
    wanted = [t] + [w for w in wanted if w.name != t.name and not w.path.is_file()]
    try:
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for w in wanted:
                info = _find_member(members, w.member or "")
                if info is None and w is t:
                    some = ", ".join(sorted(members)[:5]) or "no files"
                    raise job.fail(f"the archive {archive} has no member {t.member} (it holds {some}...)")
                if info is not None:
                    _extract(job, tar, info, w)
    except (tarfile.TarError, EOFError) as e:
        raise job.fail(
            f"{archive} is not a readable tar archive ({type(e).__name__}: {e}); delete it"
        ) from None
    archive.unlink()  # its checksum stays in the manifest: a later download must be the same file


def fetch(t: Teacher, catalogue: Catalogue | None = None, progress: bool | None = None) -> Path:
    """The cached checkpoint of ``t``, downloaded, checked and unpacked first if needed (docs/teachers.md).

    ``catalogue``: unpack its other entries from the same archive too. ``progress``: the tqdm bar (None:
    when stderr is a terminal)."""
    with locked(cache_root() / ".lock"):
        job = _Job(t, Manifest(), progress)
        final_sha = t.member_sha256 if t.member else t.sha256
        if t.path.is_file():
            _check_cached(job, t.path, final_sha, None if t.member else t.sha256_prefix)
            return t.path
        if t.member is None:
            _download(job, t.path, t.sha256, t.sha256_prefix)
            return t.path
        if t.download_path.is_file():
            _check_cached(job, t.download_path, t.sha256, t.sha256_prefix)
        else:
            _download(job, t.download_path, t.sha256, t.sha256_prefix)
        _unpack(job, t.download_path, catalogue)
        return t.path


@dataclass
class Check:
    """One line of ``mimkd teachers verify``."""

    name: str
    path: Path
    status: str  # ok, MISMATCH, unrecorded, not cached
    detail: str = ""


def verify(catalogue: Catalogue) -> list[Check]:
    """Re-hash every cached checkpoint against the catalogue's checksum or the manifest's record."""
    manifest, out = Manifest(), []
    for t in catalogue.teachers.values():
        if not t.path.is_file():
            state = cache_state(t)
            out.append(Check(t.name, t.path, "not cached", "" if state == "no" else f"({state})"))
            continue
        sha = t.member_sha256 if t.member else t.sha256
        digest, refusal = _check(t.path, t.path, manifest, sha, None if t.member else t.sha256_prefix)
        if refusal:
            out.append(Check(t.name, t.path, "MISMATCH", refusal))
        elif _expected(t.path, manifest, sha, None if t.member else t.sha256_prefix) is None:
            out.append(
                Check(t.name, t.path, "unrecorded", f"sha256 {digest[:16]}..., no checksum to compare")
            )
        else:
            out.append(Check(t.name, t.path, "ok", f"sha256 {digest[:16]}..."))
    return out


def cache_state(t: Teacher) -> str:
    """``yes``, ``no``, or what an unfinished fetch left (``partial 12.0 MiB``, ``archive``)."""
    if t.path.is_file():
        return "yes"
    part = t.download_path.with_name(t.download_path.name + ".part")
    if part.is_file():
        return f"partial {part.stat().st_size / 2**20:.1f} MiB"
    return "archive" if t.member and t.download_path.is_file() else "no"
