"""Checks made before a run directory is touched: do the networks and the method work on this data?

:func:`probe_network` runs a network once (eval mode, no gradient) on a few images of the run's data and
checks that it returns ``(batch, num_classes)`` logits; :func:`probe_distiller` runs one training forward and
backward of the method on a copy of it, on a probe batch of the run's batch size (at most
``PROBE_BATCH`` images). Both leave the real networks, the method state and every random number generator as
they were, so a checked run is bit-identical to an unchecked one. A failure becomes one
:class:`~mimkd.errors.ModelError`/:class:`~mimkd.errors.MethodError` line that names the problem and the fix,
before anything is written (so ``--overwrite`` cannot lose the old run to a configuration that cannot start).
See ``docs/reliability.md``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mimkd.checkpoint import capture_rng, restore_rng
from mimkd.data import ImageDataset
from mimkd.data.views import build_views
from mimkd.errors import MethodError, MimkdError, ModelError

__all__ = ["probe_network", "probe_distiller", "PROBE_BATCH", "first_line"]

#: the largest probe batch of :func:`probe_distiller` (the run's batch size when smaller)
PROBE_BATCH = 16


def first_line(e: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` of an exception, cut to ``limit`` characters."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {(text[0] if text else '')[:limit]}".rstrip(": ")


def probe_network(net: nn.Module, sample: torch.Tensor, num_classes: int, who: str, arch: str) -> None:
    """Run ``net`` on ``sample`` (eval mode, no gradient) and check its logits' shape; raise ModelError."""
    c, h, w = sample.shape[1:]
    data = f"{c}-channel {h}×{w} images, {num_classes} classes"
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(sample)
    except MimkdError:
        raise
    except Exception as e:
        raise ModelError(
            f"the {who} {arch!r} fails on this data's images ({data}): {first_line(e)}. Build it for "
            f"{c}-channel {h}×{w} inputs (a factory is called with in_channels=) or resize the data with "
            "--image-size"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"the {who} {arch!r} returns a {type(out).__name__}, not a tensor of logits: a model must "
            "return (batch, classes) logits (features are taken by hooks)"
        )
    if out.ndim != 2 or out.shape[0] != sample.shape[0] or out.shape[1] != num_classes:
        raise ModelError(
            f"the {who} {arch!r} outputs shape {tuple(out.shape)} for a batch of {sample.shape[0]}, but the "
            f"data has {num_classes} classes: build it with num_classes={num_classes} (a factory is called "
            "with num_classes=)"
        )


def probe_distiller(
    distiller: nn.Module, train: ImageDataset, augment, batch_size: int, with_labels: bool
) -> None:
    """One forward and backward of the method on a copy, on ``min(batch_size, PROBE_BATCH)`` training
    images; nothing of the real distiller or of the RNGs changes. Raise MethodError on failure."""
    n = min(batch_size, PROBE_BATCH, len(train))
    index = torch.arange(n)
    rng = capture_rng("cpu")  # the probe runs on the CPU: the CUDA generators are not touched
    try:
        images = augment(train.images[:n], torch.Generator().manual_seed(0))
        views = {
            name: view(train.images[:n], torch.Generator().manual_seed(1 + i))
            for i, (name, view) in enumerate(build_views(_declared_views(distiller), augment).items())
        }
        labels = train.labels[:n] if with_labels else None
        try:
            probe = copy.deepcopy(distiller)
        except Exception:  # a method holding non-copyable state (e.g. a computed tensor): no probe
            return
        probe.train()
        _, terms = probe(images, labels, index, views=views) if views else probe(images, labels, index)
        if terms:
            sum(t.float().sum() for t in terms.values()).backward()
    except MimkdError:
        raise
    except Exception as e:
        name = getattr(distiller, "name", type(distiller).__name__)
        raise MethodError(
            f"method {name!r} fails on a probe batch of {n} training images: {first_line(e)}. Check the "
            "method options, the batch size and that the student and teacher fit the data"
        ) from None
    finally:
        restore_rng(rng, "cpu")


def _declared_views(distiller: nn.Module) -> tuple[str, ...]:
    caps = getattr(distiller, "capabilities", None)
    return tuple(getattr(caps, "views", ()))
