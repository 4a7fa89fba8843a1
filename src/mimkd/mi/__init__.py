"""Mutual-information machinery shared by MIMKD, CRD and WCoRD.

* :mod:`mimkd.mi.bounds` — JSD, infoNCE, Donsker-Varadhan bounds and CRD's NCE loss on critic scores.
* :mod:`mimkd.mi.critics` — concat-and-1×1-conv critic, DIM projection head, project-and-dot critic.
* :mod:`mimkd.mi.memory` — CRD's momentum memory bank and class-aware negative sampler.
* :mod:`mimkd.mi.negatives` — in-batch negatives (derangements, all pairs).
"""

from mimkd.mi.bounds import crd_nce_loss, dv_bound, infonce_bound, infonce_loss, jsd_bound, jsd_loss
from mimkd.mi.critics import ConcatConvCritic, ProjectDotCritic, ProjectionHead
from mimkd.mi.memory import ClassAwareNegativeSampler, MemoryBank
from mimkd.mi.negatives import all_pairs_negatives, derangement, roll_derangement

__all__ = [
    "ClassAwareNegativeSampler",
    "ConcatConvCritic",
    "MemoryBank",
    "ProjectDotCritic",
    "ProjectionHead",
    "all_pairs_negatives",
    "crd_nce_loss",
    "derangement",
    "dv_bound",
    "infonce_bound",
    "infonce_loss",
    "jsd_bound",
    "jsd_loss",
    "roll_derangement",
]
