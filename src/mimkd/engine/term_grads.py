"""Per-term gradient diagnostics: what each loss term sends into the student (``train.log_term_grads=N``).

Every N training steps, before the step's own backward, each named term's gradient with respect to the
student's trainable parameters is computed on its own (``torch.autograd.grad`` with the graph retained, one
extra backward per term), flattened, and summarised against cross-entropy's:

* ``grad.<term>.norm`` — ``‖∇θ term‖₂`` (the weighted term, as the step applies it);
* ``grad.<term>.ratio_ce`` — ``‖∇θ term‖ / ‖∇θ ce‖``: how strong the term is next to the task loss;
* ``grad.<term>.cos_ce`` — ``cos(∇θ term, ∇θ ce)``: whether it pulls with the task loss (1), across it (0)
  or against it (−1);
* ``grad.total.norm`` — the norm of the sum (what the optimiser sees on the student).

The reference is the method's ``ce`` term. A method without one (its CE weight is 0) is compared with the
unweighted cross-entropy of its logits, reported as ``grad.ce_unweighted.norm``. A term that does not reach
the student (a weight of 0, a critic-only term) has norm 0 and cosine 0.

The step itself is unchanged: the same backward follows, so a run with diagnostics ends with the same weights
as one without (tested). Only the logged steps pay (one backward per term); the trainer averages the logged
steps of each epoch into ``metrics.jsonl`` and writes every logged step to TensorBoard. See
``docs/diagnostics.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TermGradients", "term_gradient_stats"]

_EPS = 1e-12


def _flat_grad(loss: Tensor, params: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]
    )


def term_gradient_stats(
    terms: dict[str, Tensor], params: list[Tensor], reference: Tensor
) -> dict[str, Tensor]:
    """Norm, ratio to the reference's norm and cosine with the reference for each term's gradient on
    ``params`` (``reference`` is a loss whose gradient is the yardstick, usually ``terms["ce"]``)."""
    ref = _flat_grad(reference, params)
    ref_norm = ref.norm()
    out: dict[str, Tensor] = {}
    total = torch.zeros_like(ref)
    for name, term in terms.items():
        g = (
            ref
            if term is reference
            else _flat_grad(term, params)
            if term.requires_grad
            else torch.zeros_like(ref)
        )
        total += g
        norm = g.norm()
        out[f"grad.{name}.norm"] = norm
        out[f"grad.{name}.ratio_ce"] = norm / ref_norm.clamp_min(_EPS)
        out[f"grad.{name}.cos_ce"] = (g @ ref) / (norm * ref_norm).clamp_min(_EPS)
    if all(t is not reference for t in terms.values()):
        out["grad.ce_unweighted.norm"] = ref_norm
    out["grad.total.norm"] = total.norm()
    return {k: v.detach() for k, v in out.items()}


class TermGradients:
    """The trainer's probe: called with a step's logits, labels and terms on the logged steps."""

    def __init__(self, student: nn.Module) -> None:
        self.params = [p for p in student.parameters() if p.requires_grad]

    def __call__(
        self, logits: Tensor | None, labels: Tensor | None, terms: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        if not self.params:
            return {}
        reference = terms.get("ce")
        if reference is None:
            if logits is None or labels is None:  # a label-free stage: nothing to compare with
                return {}
            reference = F.cross_entropy(logits.float(), labels)
        return term_gradient_stats(terms, self.params, reference)
