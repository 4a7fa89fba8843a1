"""The teacher catalogue (``catalogue.json``, shipped in the package) and where its files live.

An entry names a published checkpoint (``repdistiller:resnet32x4``, ``torchvision:resnet34``): the zoo
architecture it fits, the dataset, the published top-1, and where to get it (a source's base URL plus a file
name, and for an archive the member inside it) with the checksum the source publishes, if any.
Environment (docs/teachers.md):

* ``MIMKD_HOME``: the cache root (default ``~/.cache/mimkd``); teachers go to its ``pretrained/`` folder;
* ``MIMKD_TEACHERS_URL``: a mirror: one base URL for every source, or ``source=URL,source=URL``;
* ``MIMKD_TEACHERS_CATALOGUE``: a JSON file of extra (or replacing) sources and teachers, same layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mimkd.errors import ConfigError, unknown_name_error

__all__ = ["Teacher", "Catalogue", "load_catalogue", "home", "cache_root", "mirror_bases"]

FORMAT = "mimkd-teacher-catalogue"


def home() -> Path:
    """The mimkd cache root: ``$MIMKD_HOME``, default ``~/.cache/mimkd`` (docs/teachers.md)."""
    env = os.environ.get("MIMKD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimkd"


def cache_root() -> Path:
    """Where fetched teachers go: ``$MIMKD_HOME/pretrained`` (the demo keeps its own in ``teachers/``)."""
    return home() / "pretrained"


def mirror_bases() -> dict[str, str]:
    """``MIMKD_TEACHERS_URL`` parsed: ``{"*": base}`` for one URL, ``{source: base}`` for a mapping."""
    raw = os.environ.get("MIMKD_TEACHERS_URL", "").strip()
    if not raw:
        return {}
    if "=" not in raw.split("://", 1)[0] and "," not in raw:
        return {"*": raw}
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        source, sep, base = part.partition("=")
        if not sep or not base.strip():
            raise ConfigError(
                f"MIMKD_TEACHERS_URL={raw!r}: expected one base URL, or source=URL,source=URL "
                "(docs/teachers.md)"
            )
        out[source.strip()] = base.strip()
    return out


@dataclass(frozen=True)
class Teacher:
    """One catalogue entry (docs/teachers.md, "The catalogue")."""

    name: str
    arch: str
    dataset: str
    num_classes: int
    input: tuple[int, ...]
    source: str
    file: str
    url: str
    top1: float | None = None
    member: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    member_sha256: str | None = None
    size_mb: float | None = None
    layout: str = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def namespace(self) -> str:
        return self.name.partition(":")[0]

    @property
    def short(self) -> str:
        return self.name.partition(":")[2]

    @property
    def path(self) -> Path:
        """The cached checkpoint: ``pretrained/<namespace>/<short>/<file name>``."""
        base = Path(self.member).name if self.member else self.file
        return cache_root() / self.namespace / self.short / base

    @property
    def download_path(self) -> Path:
        """Where the downloaded file lands: the checkpoint itself, or the archive under ``downloads/``."""
        if self.member is None:
            return self.path
        return cache_root() / "downloads" / self.source / self.file


@dataclass
class Catalogue:
    """The entries by name, and the sources they come from."""

    teachers: dict[str, Teacher]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def namespaces(self) -> set[str]:
        return {t.namespace for t in self.teachers.values()}

    def get(self, name: str) -> Teacher:
        """The entry ``name``; an unknown name is a ConfigError with suggestions."""
        if name not in self.teachers:
            raise unknown_name_error("teacher", name, self.teachers, ConfigError)
        return self.teachers[name]

    def from_archive(self, source: str, file: str) -> list[Teacher]:
        """Every entry unpacked from the archive ``file`` of ``source``."""
        return [t for t in self.teachers.values() if t.member and (t.source, t.file) == (source, file)]


def _read(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"teacher catalogue {where}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("teachers", {}), dict):
        raise ConfigError(f"teacher catalogue {where}: expected an object with 'teachers' (docs/teachers.md)")
    return data


def _entry(
    name: str, e: dict[str, Any], sources: dict[str, dict[str, Any]], bases: dict[str, str]
) -> Teacher:
    src = e.get("source")
    if src not in sources or "base_url" not in sources[src]:
        raise ConfigError(f"teacher catalogue: {name!r} names source {src!r}, which has no base_url")
    base = bases.get(src) or bases.get("*") or sources[src]["base_url"]
    try:
        return Teacher(
            name=name,
            arch=e["arch"],
            dataset=e["dataset"],
            num_classes=int(e["num_classes"]),
            input=tuple(int(x) for x in e["input"]),
            source=src,
            file=e["file"],
            url=base.rstrip("/") + "/" + e["file"],
            top1=e.get("top1"),
            member=e.get("member"),
            sha256=e.get("sha256"),
            sha256_prefix=e.get("sha256_prefix"),
            member_sha256=e.get("member_sha256"),
            size_mb=e.get("size_mb"),
            layout=e.get("layout", ""),
            mean=tuple(e.get("mean", ())),
            std=tuple(e.get("std", ())),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"teacher catalogue: entry {name!r} is incomplete ({type(err).__name__}: {err})"
        ) from None


def load_catalogue(extra: str | Path | None = None) -> Catalogue:
    """The shipped catalogue, plus ``extra`` (default ``$MIMKD_TEACHERS_CATALOGUE``) merged over it, with the
    mirror of ``MIMKD_TEACHERS_URL`` applied to every URL (docs/teachers.md)."""
    parts = [_read(resources.files(__package__).joinpath("catalogue.json").read_text(), "(shipped)")]
    extra = extra if extra is not None else os.environ.get("MIMKD_TEACHERS_CATALOGUE")
    if extra:
        p = Path(extra).expanduser()
        if not p.is_file():
            raise ConfigError(f"MIMKD_TEACHERS_CATALOGUE: {str(p)!r} is not a file")
        parts.append(_read(p.read_text(), repr(str(p))))
    sources: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, Any]] = {}
    for part in parts:
        sources.update(part.get("sources", {}))
        raw.update(part.get("teachers", {}))
    bases = mirror_bases()
    teachers = {}
    for name, e in raw.items():
        if ":" not in name:
            raise ConfigError(f"teacher catalogue: name {name!r} must be NAMESPACE:NAME (e.g. lab:resnet56)")
        teachers[name] = _entry(name, e, sources, bases)
    return Catalogue(teachers, sources)
