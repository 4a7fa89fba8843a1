"""Distillation methods: one file per method, each registered by decorator (see :mod:`.registry`).

Every module of this package is imported here, so a new method file registers itself by existing.
"""

import importlib
import pkgutil

from .base import Capabilities, DistillContext, Distiller, InitStage, MethodOptions, StepContext
from .registry import available, build_distiller, get_method, register_distiller, validate_options

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "Capabilities",
    "Distiller",
    "StepContext",
    "DistillContext",
    "InitStage",
    "MethodOptions",
    "available",
    "build_distiller",
    "get_method",
    "register_distiller",
    "validate_options",
]
