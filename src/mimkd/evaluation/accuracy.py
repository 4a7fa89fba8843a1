"""Top-k accuracy of a classifier on an in-memory dataset."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["evaluate", "topk_correct"]


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module, batches, memory_format: torch.memory_format = torch.contiguous_format
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` over ``batches`` of (images, labels, ...).

    The model is put in eval mode for the pass and restored to its previous mode afterwards.
    """
    was = model.training
    model.eval()
    c1 = c5 = loss = None
    n = 0
    try:
        for batch in batches:
            images, labels = batch[0].contiguous(memory_format=memory_format), batch[1]
            logits = model(images)
            a, b = topk_correct(logits, labels, (1, 5))
            ce = F.cross_entropy(logits.float(), labels, reduction="sum")
            c1 = a if c1 is None else c1 + a
            c5 = b if c5 is None else c5 + b
            loss = ce if loss is None else loss + ce
            n += labels.numel()
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100.0 * float(c1) / n, "top5": 100.0 * float(c5) / n, "loss": float(loss) / n}
