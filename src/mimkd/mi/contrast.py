"""Contrast against a momentum memory bank in both directions (spec §1.3; CRD's machinery, §2.3).

:class:`BankContrast` holds one :class:`~mimkd.mi.memory.MemoryBank` per network and a
:class:`~mimkd.mi.memory.ClassAwareNegativeSampler`. Given the L2-normalised embeddings ``z_s`` (student) and
``z_t`` (teacher) of a batch and the samples' dataset indices, it scores

* student anchors against the teacher bank: ``<z_s,i, M_t[j]>/τ`` and
* teacher anchors against the student bank: ``<z_t,i, M_s[j]>/τ``,

for ``j ∈ {i} ∪ N_i`` (the positive is the bank row of the sample itself, written on earlier visits; the K
negatives come from other classes), turns the scores into a loss, then updates both banks with momentum.

Losses (``loss`` option):

* ``"infonce"`` — softmax cross-entropy over the 1+K logits, positive at index 0 (MIMKD Eq. 1, the spec's
  [PROPOSAL] for the global term). The MI estimate is ``log(K+1) − CE`` nats per direction.
* ``"nce"`` — CRD's NCE: ``P = exp(score)/Z`` with ``Z`` fixed at the first call to
  ``mean(exp(score))·N`` per direction, and :func:`~mimkd.mi.bounds.crd_nce_loss`. ``Z`` is a buffer, so it
  survives checkpoints.

The loss is the sum of the chosen directions (``directions``: ``"both"``, ``"student"``, ``"teacher"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mimkd.errors import MethodError

from .bounds import crd_nce_loss, infonce_loss
from .memory import ClassAwareNegativeSampler, MemoryBank, mean_over_ranks

__all__ = ["BankContrast"]


class BankContrast(nn.Module):
    """Two momentum banks + class-aware negatives; the bidirectional bank contrast of CRD and MIMKD."""

    def __init__(
        self,
        labels: Tensor,
        dim: int = 128,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
        loss: str = "infonce",
        directions: str = "both",
    ) -> None:
        super().__init__()
        if loss not in ("infonce", "nce"):
            raise MethodError(f"BankContrast: loss must be 'infonce' or 'nce', got {loss!r}")
        if directions not in ("both", "student", "teacher"):
            raise MethodError(
                f"BankContrast: directions must be 'both', 'student' or 'teacher', got {directions!r}"
            )
        if temperature <= 0:
            raise MethodError(f"BankContrast: temperature must be > 0, got {temperature}")
        n = int(labels.numel())
        self.loss_kind, self.directions = loss, directions
        self.temperature = float(temperature)
        self.num_negatives = int(num_negatives)
        self.sampler = ClassAwareNegativeSampler(labels, num_negatives)
        self.bank_student = MemoryBank(n, dim, momentum)
        self.bank_teacher = MemoryBank(n, dim, momentum)
        # CRD's normalising constants, fixed at the first call (negative = not yet set)
        self.register_buffer("z_student_anchor", torch.tensor(-1.0))
        self.register_buffer("z_teacher_anchor", torch.tensor(-1.0))

    @property
    def num_samples(self) -> int:
        return self.bank_student.num_samples

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss_kind}, directions={self.directions}, K={self.num_negatives}, "
            f"tau={self.temperature}"
        )

    def _direction(self, z: Tensor, bank: MemoryBank, idx: Tensor, z_const: Tensor) -> tuple[Tensor, Tensor]:
        logits = bank.scores(z, idx) / self.temperature  # B×(K+1), positive in column 0
        if self.loss_kind == "infonce":
            loss = infonce_loss(logits[:, 0], logits[:, 1:])
            return loss, math.log(logits.shape[1]) - loss.detach()
        prob = torch.exp(logits)
        if float(z_const) < 0:  # first call: fix Z = mean(exp(score))·N, as CRD does (global batch mean)
            z_const.fill_(float(mean_over_ranks(prob.detach().mean(), z.shape[0])) * self.num_samples)
        prob = prob / z_const
        loss = crd_nce_loss(prob[:, 0], prob[:, 1:], self.num_samples)
        return loss, -loss.detach()

    def forward(self, z_student: Tensor, z_teacher: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Loss (sum over directions) and the mean MI estimate (nats for infoNCE); updates both banks."""
        if index is None:
            raise MethodError(
                "the memory-bank contrast needs each sample's dataset index: call the distiller with "
                "(images, labels, index)"
            )
        idx = self.sampler.sample(index)
        losses, estimates = [], []
        if self.directions in ("both", "student"):
            loss, est = self._direction(z_student, self.bank_teacher, idx, self.z_student_anchor)
            losses.append(loss)
            estimates.append(est)
        if self.directions in ("both", "teacher"):
            loss, est = self._direction(z_teacher, self.bank_student, idx, self.z_teacher_anchor)
            losses.append(loss)
            estimates.append(est)
        self.bank_student.update(index, z_student)
        self.bank_teacher.update(index, z_teacher)
        return sum(losses), sum(estimates) / len(estimates)
