"""Contrast against a momentum memory bank in both directions (CRD's machinery; docs/mimkd.md).

:class:`BankContrast` holds one :class:`~mimkd.mi.memory.MemoryBank` per network and a
:class:`~mimkd.mi.memory.ClassAwareNegativeSampler`. Given the L2-normalised embeddings ``z_s`` (student) and
``z_t`` (teacher) of a batch and the samples' dataset indices, it scores

* student anchors against the teacher bank: ``<z_s,i, M_t[j]>/τ`` and
* teacher anchors against the student bank: ``<z_t,i, M_s[j]>/τ``,

for ``j ∈ {i} ∪ N_i`` (the positive is the bank row of the sample itself, written on earlier visits; the K
negatives come from other classes), turns the scores into a loss, then updates both banks with momentum.

Losses (``loss`` option):

* ``"infonce"`` — softmax cross-entropy over the 1+K logits, positive at index 0 (MIMKD Eq. 1, our
  choice for the global term, docs/mimkd.md). The MI estimate is ``log(K+1) − CE`` nats per direction.
* ``"nce"`` — CRD's NCE: ``P = exp(score)/Z`` with ``Z`` fixed at the first call to
  ``mean(exp(score))·N`` per direction, and :func:`~mimkd.mi.bounds.crd_nce_loss`. ``Z`` is a buffer, so it
  survives checkpoints.

The loss is the sum of the chosen directions (``directions``: ``"both"``, ``"student"``, ``"teacher"``).

Positive (``positive``): ``"bank"`` (CRD's and the paper's choice) scores the anchor against the sample's own
bank row, written on the sample's last visit: one epoch stale, and a random vector throughout the first
epoch. ``"live"`` scores it against the other network's embedding of the same image in the current batch,
``<z_s,i, z_t,i>/τ`` in both directions (gradients reach both embeddings); the negatives still come from the
banks. ``live`` is a deviation from CRD and MIMKD, offered for short schedules (``docs/mimkd.md``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mimkd.errors import MethodError

from .bounds import crd_nce_loss, infonce_loss
from .memory import ClassAwareNegativeSampler, MemoryBank, mean_over_ranks

__all__ = ["BankContrast", "MIN_VISITS", "MAX_NEGATIVE_SHARE"]

#: fewer visits per sample than this over a run: the bank's positives are stale (a warning before training)
MIN_VISITS = 20
#: K above this share of the smallest other-class pool: the negatives are most of the pool (a warning)
MAX_NEGATIVE_SHARE = 0.5


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
        positive: str = "bank",
    ) -> None:
        super().__init__()
        if loss not in ("infonce", "nce"):
            raise MethodError(f"BankContrast: loss must be 'infonce' or 'nce', got {loss!r}")
        if directions not in ("both", "student", "teacher"):
            raise MethodError(
                f"BankContrast: directions must be 'both', 'student' or 'teacher', got {directions!r}"
            )
        if positive not in ("bank", "live"):
            raise MethodError(f"BankContrast: positive must be 'bank' or 'live', got {positive!r}")
        if temperature <= 0:
            raise MethodError(f"BankContrast: temperature must be > 0, got {temperature}")
        n = int(labels.numel())
        self.loss_kind, self.directions, self.positive = loss, directions, positive
        self.temperature = float(temperature)
        self.num_negatives = int(num_negatives)
        self.sampler = ClassAwareNegativeSampler(labels, num_negatives)
        self.min_pool = n - int(torch.bincount(labels.reshape(-1).long()).max()) if n else 0
        self.bank_student = MemoryBank(n, dim, momentum)
        self.bank_teacher = MemoryBank(n, dim, momentum)
        # CRD's normalising constants, fixed at the first call (negative = not yet set)
        self.register_buffer("z_student_anchor", torch.tensor(-1.0))
        self.register_buffer("z_teacher_anchor", torch.tensor(-1.0))
        # whether each constant is set, mirrored on the host so that a step never reads the device for it
        self._z_set = {"z_student_anchor": False, "z_teacher_anchor": False}
        self.register_load_state_dict_post_hook(_mirror_z)

    @property
    def num_samples(self) -> int:
        return self.bank_student.num_samples

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss_kind}, directions={self.directions}, positive={self.positive}, "
            f"K={self.num_negatives}, tau={self.temperature}"
        )

    def schedule_warnings(self, visits: float) -> list[str]:
        """Warnings for a run that shows each sample ``visits`` times: negatives that are most of the
        other-class pool (K > half of the smallest pool), and stale bank positives (fewer than
        :data:`MIN_VISITS` visits, unless the positive is live)."""
        out = []
        k, pool, n = self.num_negatives, self.min_pool, self.num_samples
        if k > MAX_NEGATIVE_SHARE * pool:
            suggest = max(1, round(0.082 * n))
            out.append(
                f"K={k} bank negatives are {k / max(pool, 1):.0%} of the smallest other-class pool ({pool} "
                f"of {n} samples), so every step contrasts against most of the training set; lower "
                f"method.num_negatives, e.g. to {suggest} (8 % of the training set, as 4,096 of CIFAR-100's "
                "50,000)"
            )
        if self.positive == "bank" and visits < MIN_VISITS:
            out.append(
                f"each training sample is seen {visits:.4g} times in this run, and the bank's positive for a "
                f"sample is the row written on its previous visit (random until its first): train for at "
                f"least {MIN_VISITS} epochs (with mimkd, method.critic_warmup_epochs=2 also fills the bank "
                "before the first epoch)"
            )
        return out

    def _direction(
        self, z: Tensor, bank: MemoryBank, idx: Tensor, z_name: str, other: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.positive == "live":  # the other network's current embedding of the same image
            pos = (z * other.to(z.dtype)).sum(1, keepdim=True)
            logits = torch.cat([pos.to(bank.memory.dtype), bank.scores(z, idx[:, 1:])], 1) / self.temperature
        else:
            logits = bank.scores(z, idx) / self.temperature  # B×(K+1), positive in column 0
        if self.loss_kind == "infonce":
            loss = infonce_loss(logits[:, 0], logits[:, 1:])
            return loss, math.log(logits.shape[1]) - loss.detach()
        prob = torch.exp(logits)
        z_const = getattr(self, z_name)
        if not self._z_set[z_name]:  # first call: fix Z = mean(exp(score))·N, as CRD does (global batch mean)
            z_const.fill_(float(mean_over_ranks(prob.detach().mean(), z.shape[0])) * self.num_samples)
            self._z_set[z_name] = True
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
            loss, est = self._direction(z_student, self.bank_teacher, idx, "z_student_anchor", z_teacher)
            losses.append(loss)
            estimates.append(est)
        if self.directions in ("both", "teacher"):
            loss, est = self._direction(z_teacher, self.bank_student, idx, "z_teacher_anchor", z_student)
            losses.append(loss)
            estimates.append(est)
        self.bank_student.update(index, z_student)
        self.bank_teacher.update(index, z_teacher)
        return sum(losses), sum(estimates) / len(estimates)


def _mirror_z(module: BankContrast, incompatible_keys: object) -> None:
    """After a state dict is loaded, mirror which constants are set (one read each, at load time)."""
    module._z_set = {k: bool(getattr(module, k) >= 0) for k in module._z_set}
