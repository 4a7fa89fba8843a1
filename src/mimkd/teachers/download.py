"""HTTP downloads that resume: a ``.part`` file grows until it holds the whole file (docs/teachers.md).

:func:`http_download` asks for the missing bytes with an HTTP ``Range`` request when a ``.part`` file is
there, starts over when the server answers with the whole file (200 instead of 206), and shows a tqdm bar.
A failure raises :class:`DownloadError` with a short reason; the bytes received so far stay in the ``.part``
file for the next attempt. Only the standard library (urllib) is used: proxies come from ``https_proxy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["DownloadError", "http_download", "sha256_file", "locked"]

CHUNK = 1 << 16
TIMEOUT_S = 30.0


class DownloadError(Exception):
    """A download failed; ``str(e)`` is a short reason (the caller adds what to do), ``status`` the HTTP
    status when the server answered."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_file`` (``flock``; nothing where it is unavailable): two processes (e.g.
    the ranks of a torchrun launch) never write the same cache entry at once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"the server answered {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else OSError(str(e.reason))
    if isinstance(e, socket.gaierror):
        return f"the host name does not resolve ({e.strerror or e})"
    if isinstance(e, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"no answer within {TIMEOUT_S:.0f} s"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _open(url: str, start: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": "mimkd-teacher-fetch/1", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        raise DownloadError(_reason(e), e.code) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(_reason(e)) from None


def _resumes(resp: http.client.HTTPResponse, start: int) -> bool:
    """The answer continues at byte ``start`` (206 with a matching Content-Range)."""
    if not start or resp.status != 206:
        return False
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return bool(m) and int(m.group(1)) == start


def _copy(resp: http.client.HTTPResponse, f: BinaryIO, bar) -> None:
    try:
        while chunk := resp.read(CHUNK):
            f.write(chunk)
            bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"the transfer broke off ({_reason(e)})") from None
    finally:
        f.flush()
        os.fsync(f.fileno())


def http_download(url: str, part: Path, label: str, progress: bool | None = None) -> int:
    """Fill ``part`` with the file at ``url``, resuming what an earlier attempt left; returns its size.

    ``progress``: True always shows the bar (stderr), False never, None when stderr is a terminal.
    """
    from tqdm import tqdm

    part.parent.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start)
    except DownloadError as e:
        if start and e.status == 416:  # nothing left to send (or the file changed): start over
            part.unlink()
            return http_download(url, part, label, progress)
        raise
    with resp:
        if not _resumes(resp, start):
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=None if progress is None else not progress,
            ncols=min(shutil.get_terminal_size((100, 20)).columns, 120),  # a 0-wide pty: 100
        )
        with bar, open(part, "ab" if start else "wb") as f:
            _copy(resp, f, bar)
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"the transfer broke off after {size:,} of {total:,} bytes")
    return size
