"""Distillation methods: one file per method, each registered by decorator (see :mod:`.registry`)."""

from . import kd, mimkd, vanilla  # noqa: F401  (registration)
from .base import DistillContext, Distiller, InitStage, MethodOptions
from .registry import available, build_distiller, get_method, register_distiller, validate_options

__all__ = [
    "Distiller",
    "DistillContext",
    "InitStage",
    "MethodOptions",
    "available",
    "build_distiller",
    "get_method",
    "register_distiller",
    "validate_options",
]
