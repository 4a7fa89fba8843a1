"""Published teachers by name, their cache, and teachers in the Hugging Face Hub layout (docs/teachers.md).

``mimkd teachers list | fetch NAME... | verify`` (:mod:`mimkd.cli.teachers`) and ``--teacher NAME`` use this
package: :mod:`.catalogue` (the shipped ``catalogue.json``, ``MIMKD_HOME``, the ``MIMKD_TEACHERS_URL``
mirror), :mod:`.download` (resumable HTTP), :mod:`.store` (checksums, unpacking, the manifest, verify),
:mod:`.hf` (Hub folders and ``hf:ORG/REPO``) and :mod:`.resolve` (what ``--teacher`` means).
"""

from .catalogue import Catalogue, Teacher, cache_root, home, load_catalogue
from .resolve import is_teacher_name, resolve_teacher
from .store import TeacherFetchError, cache_state, fetch, verify

__all__ = [
    "Catalogue",
    "Teacher",
    "TeacherFetchError",
    "cache_root",
    "cache_state",
    "fetch",
    "home",
    "is_teacher_name",
    "load_catalogue",
    "resolve_teacher",
    "verify",
]
