"""``vanilla``: the student trained alone with cross-entropy (the baseline every table starts from)."""

from __future__ import annotations

from pydantic import Field

from .base import Capabilities, Distiller, MethodOptions
from .registry import register_distiller


class VanillaOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@register_distiller("vanilla")
class Vanilla(Distiller):
    """Cross-entropy only; no teacher is needed (one is ignored if given)."""

    Options = VanillaOptions
    capabilities = Capabilities(requires_teacher=False)

    def __init__(self, student, teacher, options, context):
        super().__init__(student, None, options, context)

    def compute(self, images, labels, index=None, ctx=None):
        logits = self.student(images)
        o = self.options
        return logits, {"ce": o.ce_weight * self.cross_entropy(logits, labels, o.label_smoothing)}
