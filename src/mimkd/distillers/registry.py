"""Decorator registry of distillation methods; ``build_distiller`` and the CLI read the same table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError

from mimkd.errors import ConfigError, MethodError, did_you_mean, unknown_name_error

from .base import DistillContext, Distiller, MethodOptions

__all__ = ["register_distiller", "available", "get_method", "validate_options", "build_distiller"]

_METHODS: dict[str, type[Distiller]] = {}


def register_distiller(name: str):
    """Class decorator: register a :class:`Distiller` subclass under ``name``."""

    def deco(cls: type[Distiller]) -> type[Distiller]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    import mimkd.distillers  # noqa: F401  (importing the package registers every method)


#: The order in which tables list the methods: KD first (the reference of speed ratios), the classic zoo as
#: the CRD benchmark lists it, then the later methods; a method missing here follows alphabetically.
DISPLAY_ORDER = (
    "vanilla", "kd", "fitnets", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd",
    "crd+kd", "mimkd", "mimkd+kd", "wcord", "wcord+kd", "kdep", "dml", "dcm", "dkd", "kd+ls", "dkd+ls",
    "dist", "mlkd", "mlkd+ls",
)  # fmt: skip


def available(ordered: bool = False) -> list[str]:
    """Names of every registered method: sorted, or in :data:`DISPLAY_ORDER` when ``ordered``."""
    _ensure_loaded()
    if not ordered:
        return sorted(_METHODS)
    return [m for m in DISPLAY_ORDER if m in _METHODS] + sorted(m for m in _METHODS if m not in DISPLAY_ORDER)


def get_method(name: str) -> type[Distiller]:
    _ensure_loaded()
    if name not in _METHODS:
        raise unknown_name_error("method", name, _METHODS, MethodError)
    return _METHODS[name]


def validate_options(name: str, options: dict[str, Any]) -> MethodOptions:
    """Validate ``options`` against the method's options class; errors name ``method.<key>``."""
    try:
        cls = get_method(name)
    except MethodError as e:
        raise ConfigError(f"method.name: {e}") from None
    try:
        return cls.Options(**options)
    except ValidationError as e:
        fields = list(cls.Options.model_fields)
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(
                    f"method.{key}: unknown option of {name!r}.{did_you_mean(key, fields)} "
                    f"Options: {', '.join(fields) or '(none)'}"
                )
            else:
                lines.append(f"method.{key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid method options:\n  " + "\n  ".join(lines)) from None


def build_distiller(
    method: str,
    student: nn.Module,
    teacher: nn.Module | None,
    sample_input: torch.Tensor,
    *,
    num_classes: int | None = None,
    num_samples: int | None = None,
    train_labels: torch.Tensor | None = None,
    student_arch: str | None = None,
    build_network: Callable[[str], nn.Module] | None = None,
    **options: Any,
) -> Distiller:
    """Build the distiller ``method`` around any two modules.

    Args:
        method: a registered method name (``mimkd.distillers.available()``).
        student, teacher: the networks (the teacher is frozen and put in eval mode).
        sample_input: a small batch with the training input shape, used to probe feature shapes.
        num_classes: number of classes (default: inferred from the student's output on ``sample_input``).
        num_samples, train_labels: training-set size and labels, needed by memory-bank methods. A method
            whose ``capabilities.uses_labels`` is False (KDEP) never receives the labels.
        student_arch: the student's architecture name (DML/DCM build peers of the same kind from it).
        build_network: ``arch -> nn.Module`` for peer networks (default: the zoo and ``module:factory``
            models, for ``num_classes`` classes and the sample's channel count).
        **options: the method's options (see its ``Options`` class).
    """
    cls = get_method(method)
    opts = validate_options(method, options)
    if cls.requires_teacher and teacher is None:
        raise MethodError(f"method {method!r} needs a teacher network")
    if num_classes is None:
        was = student.training
        student.eval()
        with torch.no_grad():
            out = student(sample_input[:2] if sample_input.shape[0] > 2 else sample_input)
        student.train(was)
        num_classes = int(out.shape[-1])
    if train_labels is not None and num_samples is None:
        num_samples = int(train_labels.numel())
    if not cls.uses_labels:
        train_labels = None  # a label-free method cannot read them, even by accident
    if build_network is None:
        from mimkd.models import build_network as build_any

        classes, channels = num_classes, int(sample_input.shape[1])

        def build_network(arch: str) -> nn.Module:
            return build_any(arch, classes, channels)

    ctx = DistillContext(
        sample_input=sample_input,
        num_classes=num_classes,
        num_samples=num_samples,
        train_labels=train_labels,
        build_network=build_network,
        student_arch=student_arch,
    )
    return cls(student, teacher, opts, ctx)
