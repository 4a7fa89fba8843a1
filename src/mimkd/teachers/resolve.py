"""``--teacher``: a checkpoint path, a catalogue name, a Hub folder or ``hf:ORG/REPO`` (docs/teachers.md).

:func:`resolve_teacher` is the one call :func:`mimkd.engine.setup.prepare` makes: it turns the value of
``teacher.checkpoint`` into a checkpoint file the ordinary loader reads, and the architecture when the source
knows it. A path that exists is taken as it is (a Hub-layout folder is converted); ``NAMESPACE:NAME`` of the
catalogue (``repdistiller:resnet32x4``, ``torchvision:resnet34``) is fetched into the cache when missing.
"""

from __future__ import annotations

from pathlib import Path

from mimkd.errors import ConfigError

from .catalogue import load_catalogue
from .hf import hf_folder_checkpoint, hf_snapshot, is_hf_folder
from .store import fetch

__all__ = ["resolve_teacher", "is_teacher_name"]


def is_teacher_name(spec: str) -> bool:
    """``spec`` names a catalogue entry's namespace (``repdistiller:...``) or the Hub (``hf:...``) and is not
    an existing path."""
    if Path(spec).exists() or ":" not in spec:
        return False
    ns = spec.partition(":")[0]
    return ns == "hf" or ns in load_catalogue().namespaces


def resolve_teacher(spec: str, arch: str | None, progress: bool | None = None) -> tuple[str, str | None]:
    """``(checkpoint path, architecture or None)`` for ``--teacher spec`` (docs/teachers.md).

    ``arch``: the architecture asked for (``--teacher-arch``; None for auto). A catalogue entry or a Hub
    folder brings its own; one that disagrees with ``arch`` is a ConfigError. A plain path is returned as is.
    """
    if spec.startswith("hf:") and not Path(spec).exists():
        return hf_folder_checkpoint(hf_snapshot(spec), arch, spec)
    if is_hf_folder(spec):
        return hf_folder_checkpoint(spec, arch, spec)
    if not is_teacher_name(spec):
        return spec, arch
    catalogue = load_catalogue()
    t = catalogue.get(spec)
    if arch is not None and arch != t.arch:
        raise ConfigError(
            f"--teacher {spec} is a {t.arch!r} (the teacher catalogue), not {arch!r}: drop --teacher-arch or "
            f"pass --teacher-arch {t.arch}"
        )
    return str(fetch(t, catalogue, progress)), t.arch
