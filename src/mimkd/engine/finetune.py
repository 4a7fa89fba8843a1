"""Fine-tuning a trained backbone on a (new) dataset: ``mimkd finetune`` (KDEP supplementary B.2).

See docs/methods/kdep.md.

A fine-tuning run is an ordinary run of the ``vanilla`` method through the normal :class:`Trainer` (run
directory, metrics, summary, checkpoints, exact resume) whose config has a ``finetune`` section
(:class:`mimkd.config.FinetuneConfig`). :func:`mimkd.engine.setup.prepare` then calls :func:`init_student`
on the freshly built student:

* every weight of the checkpoint is loaded (strictly, with a listed mismatch) except the classifier's;
* the classifier = the student's last ``nn.Linear`` (in module order) keeps the fresh initialisation
  ``build_network`` gave it for the new dataset's class count (the checkpoint's head is dropped, whatever its
  class count);
* ``linear`` mode: every other parameter stops requiring gradients (so it is in no optimiser and gets no
  weight decay) AND every module outside the classifier is pinned to eval mode (its ``train()`` always means
  ``eval``), so BatchNorm running statistics, ``num_batches_tracked`` and dropout do not move during
  training: only the classifier changes. ``full`` mode: everything trains.

It works for any checkpoint that records its architecture (a KDEP pre-trained student, a distilled student,
a plain trained model) or any ``{'model': state_dict}`` file with ``--arch``.

Presets (``--preset``): ``kdep`` = the supplementary's downstream classification schedule (B.2): SGD momentum
0.9, 150 epochs, batch 64, weight decay 5e-4, lr 0.01 (the paper also uses 0.001), ÷10 at 1/3 and 2/3 of the
epochs, the milestones computed from the epoch count actually used (``--epochs 15`` → [5, 10]). A value the
user sets (flag, ``--set``, YAML) wins over the preset. Deviation: the paper's RandomResizedCrop(224) + flip
is replaced by the dataset's own augmentation.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from mimkd.checkpoint import extract_state_dict, load_checkpoint
from mimkd.config import FinetuneConfig, OptimConfig, RunConfig, load_config
from mimkd.errors import CheckpointError, ConfigError, MimkdError, ModelError
from mimkd.models.registry import model_factory

__all__ = [
    "CheckpointInfo",
    "PRESETS",
    "inspect_checkpoint",
    "classifier_of",
    "init_student",
    "freeze_backbone",
    "third_milestones",
    "apply_preset",
    "finetune_config",
]

#: Fine-tuning schedules; milestones come from :func:`third_milestones` of the epochs used.
PRESETS: dict[str, dict[str, Any]] = {
    "kdep": dict(
        optimizer="sgd",
        momentum=0.9,
        nesterov=False,
        epochs=150,
        batch_size=64,
        weight_decay=5e-4,
        lr=0.01,
        schedule="step",
        gamma=0.1,
        warmup_epochs=0,
    ),
}


@dataclass
class CheckpointInfo:
    """What a checkpoint says about the network it holds."""

    path: str
    arch: str
    in_channels: int | None
    num_classes: int | None
    method: str | None


def inspect_checkpoint(path: str | Path, arch: str | None = None) -> CheckpointInfo:
    """Read ``path`` (a file or a run directory) and find its architecture; clear errors when the file is
    missing, holds no weights, does not say what it is, or names an unknown architecture."""
    ck = load_checkpoint(path)
    extract_state_dict(ck, str(path))  # raises when it holds no model weights
    recorded = ck.get("arch") if isinstance(ck.get("arch"), str) and ck.get("arch") != "?" else None
    arch = arch or recorded
    if arch is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a mimkd checkpoint: it does not record its architecture. Pass "
            "--arch NAME (a zoo name, mimkd models, or package.module:factory)"
        )
    if ":" not in arch:
        try:
            model_factory(arch)
        except ModelError as e:
            raise ModelError(f"checkpoint {str(path)!r} holds architecture {arch!r}: {e}") from None
    ch, nc = ck.get("in_channels"), ck.get("num_classes")
    return CheckpointInfo(
        str(path),
        arch,
        ch if isinstance(ch, int) else None,
        nc if isinstance(nc, int) else None,
        ck.get("method") if isinstance(ck.get("method"), str) else None,
    )


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier: the last ``nn.Linear`` of ``model`` in module order, with its path."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier to re-initialise")
    return linears[-1]


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_backbone(model: nn.Module, head: str) -> int:
    """Freeze every parameter outside the module ``head`` and pin every module outside it (and outside its
    ancestors) to eval mode. Returns the number of trainable parameters left."""
    for p in model.parameters():
        p.requires_grad_(False)
    head_module = model.get_submodule(head)
    for p in head_module.parameters():
        p.requires_grad_(True)
    parts = head.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts))}  # "" is the model itself
    for name, module in model.named_modules():
        if name in ancestors or name == head:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent in ancestors:  # a maximal subtree outside the head: pinned, its descendants follow it
            module.train = types.MethodType(_eval_only, module)
            module.eval()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def init_student(student: nn.Module, spec: FinetuneConfig, arch: str, in_channels: int) -> dict[str, Any]:
    """Load ``spec.checkpoint`` into ``student`` but its classifier; freeze the backbone in ``linear`` mode.
    Returns what the run summary records about the initialisation."""
    ck = load_checkpoint(spec.checkpoint)
    recorded = ck.get("in_channels")
    if isinstance(recorded, int) and recorded != in_channels:
        raise ConfigError(
            f"finetune.checkpoint {spec.checkpoint!r} was trained on {recorded}-channel images but the data "
            f"has {in_channels} channel(s): fine-tune on a dataset with {recorded}-channel images"
        )
    if isinstance(ck.get("arch"), str) and ck["arch"] not in ("?", arch):
        raise CheckpointError(
            f"finetune.checkpoint {spec.checkpoint!r} holds a {ck['arch']!r}, not the student {arch!r}"
        )
    sd = extract_state_dict(ck, spec.checkpoint)
    head, _ = classifier_of(student)
    is_head = lambda k: k.startswith(f"{head}.")  # noqa: E731
    own = student.state_dict()
    missing = [k for k in own if not is_head(k) and k not in sd]
    unexpected = [k for k in sd if not is_head(k) and k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if not is_head(k) and k in sd and tuple(getattr(sd[k], "shape", ())) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"finetune.checkpoint {spec.checkpoint!r} does not fit the backbone of {arch!r} (classifier "
            f"{head!r} excluded): missing {missing[:8]}, unexpected {unexpected[:8]}, shape mismatches "
            f"{shapes[:4]}"
        )
    student.load_state_dict({**own, **{k: v for k, v in sd.items() if not is_head(k)}}, strict=True)
    trainable = sum(p.numel() for p in student.parameters())
    if spec.mode == "linear":
        trainable = freeze_backbone(student, head)
    return {
        "checkpoint": spec.checkpoint,
        "mode": spec.mode,
        "classifier": head,
        "checkpoint_method": ck.get("method") if isinstance(ck.get("method"), str) else None,
        "checkpoint_classes": ck.get("num_classes") if isinstance(ck.get("num_classes"), int) else None,
        "trainable_params": trainable,
    }


def third_milestones(epochs: int) -> list[int]:
    """Milestones at 1/3 and 2/3 of ``epochs`` (floored; a milestone at epoch 0 is dropped)."""
    return sorted({m for m in (epochs // 3, 2 * epochs // 3) if m >= 1})


def apply_preset(cfg: RunConfig, name: str) -> RunConfig:
    """Fill the optimiser fields the user left unset from preset ``name``; milestones from the epochs."""
    if name not in PRESETS:
        raise ConfigError(f"unknown fine-tuning preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    values = cfg.optim.model_dump()
    for key, value in PRESETS[name].items():
        if values.get(key) is None:
            values[key] = value
    if values.get("milestones") is None:
        values["milestones"] = third_milestones(int(values["epochs"]))
    return cfg.model_copy(update={"optim": OptimConfig(**values)})


def finetune_config(
    checkpoint: str,
    base: dict[str, Any],
    config_path: str | None = None,
    overrides: list[str] | None = None,
    *,
    mode: str | None = None,
    preset: str | None = None,
    arch: str | None = None,
) -> RunConfig:
    """The run configuration of ``mimkd finetune CHECKPOINT``: the recorded architecture as the student, the
    ``vanilla`` method, a ``finetune`` section, the preset, and a ``finetune_<mode>_...`` run name."""
    info = inspect_checkpoint(checkpoint, arch)
    base = copy.deepcopy(base)
    base.setdefault("student", {})["arch"] = info.arch
    base.setdefault("method", {}).setdefault("name", "vanilla")
    ft = base.setdefault("finetune", {})
    ft["checkpoint"] = str(checkpoint)
    if mode is not None:
        ft["mode"] = mode
    cfg = load_config(config_path, overrides, base)
    if cfg.teacher is not None or cfg.method.name != "vanilla":
        raise MimkdError(
            "mimkd finetune trains the student alone (method vanilla, no teacher); to distil into a "
            "checkpoint-initialised student use mimkd distill --set finetune.checkpoint=PATH"
        )
    if preset:
        cfg = apply_preset(cfg, preset)
    if cfg.name is None:
        assert cfg.finetune is not None
        a = cfg.student.arch.replace(":", "_").replace("/", "_")
        cfg = cfg.model_copy(update={"name": f"finetune_{cfg.finetune.mode}_{a}_{cfg.data.name}_s{cfg.seed}"})
    return cfg
