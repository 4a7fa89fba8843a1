"""``mimkd describe``: what a method builds for a teacher/student pair, without training.

Feature pairs, critic shapes, extra trainable parameters, and FLOPs per image of the student, the teacher and
the method's own parts (forward, and a full training step: forward + backward), counted by torch's
``FlopCounterMode`` on a batch of the dataset's input shape. Weights are random: nothing is loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from mimkd.config import apply_overrides
from mimkd.data import dataset_spec
from mimkd.distillers import build_distiller, get_method, validate_options
from mimkd.engine.setup import build_network
from mimkd.errors import ConfigError
from mimkd.evaluation.flops import count_flops, count_parameters

__all__ = ["describe", "format_description"]

_BATCH = 4  # JSD terms need at least 2 images; FLOPs are reported per image


def _input_shape(data: str, image_size: int | None) -> tuple[int, int, int, int]:
    spec = dataset_spec(data)
    size = image_size or spec.image_size or 224
    classes = spec.num_classes or 1000
    return spec.channels, size, classes, spec.train_size or 50000


def _step_flops(distiller, x, y, idx, views=None) -> int:
    """FLOPs of one training step (forward + backward) of ``distiller`` on ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    distiller.train()
    with FlopCounterMode(display=False) as counter:
        _, terms = distiller(x, y, idx, views=views) if views else distiller(x, y, idx)
        sum(terms.values()).backward()
    distiller.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def describe(
    method: str,
    student: str,
    teacher: str | None,
    data: str = "cifar100",
    image_size: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Build ``method`` for ``teacher → student`` on ``data``-shaped input and report its parts and costs.

    ``teacher`` may be None for methods that train without one (``dml``, ``dcm``)."""
    channels, size, classes, n_train = _input_shape(data, image_size)
    opts_tree = apply_overrides({}, overrides or [])
    unknown = sorted(set(opts_tree) - {"method"})
    if unknown:
        raise ConfigError(f"describe takes only method.* overrides, got {', '.join(unknown)}")
    options = opts_tree.get("method", {})
    validate_options(method, options)
    if teacher is None and get_method(method).requires_teacher:
        raise ConfigError(
            f"method {method!r} distils a teacher: pass --teacher ARCH (e.g. --teacher resnet32x4)"
        )
    torch.manual_seed(0)
    s_net = build_network(student, classes, channels)
    t_net = build_network(teacher, classes, channels) if teacher else None
    x = torch.randn(_BATCH, channels, size, size)
    y = torch.randint(0, classes, (_BATCH,))
    labels = torch.arange(n_train) % classes
    idx = torch.arange(_BATCH)
    d = build_distiller(
        method, s_net, t_net, x, num_classes=classes, train_labels=labels, student_arch=student, **options
    )
    if not d.offline_ready():  # statistics over the data (KDEP's SVD): on the probe batch, for the shapes
        d.offline_pass([x], 1, None)
    vanilla = build_distiller("vanilla", s_net, None, x, num_classes=classes)
    student_fwd = count_flops(s_net, x) / _BATCH
    teacher_fwd = count_flops(t_net, x) / _BATCH if t_net is not None else 0.0
    teacher_calls: list[int] = []
    hook = t_net.register_forward_hook(lambda *_: teacher_calls.append(1)) if t_net is not None else None
    # the extra views a method reads (MLKD's strong view): random batches of the same shape
    views = {name: torch.randn_like(x) for name in d.capabilities.views}
    total_fwd = count_flops(lambda a: d(a, y, idx, views=views) if views else d(a, y, idx), x) / _BATCH
    if hook is not None:
        hook.remove()
    if not teacher_calls:  # the main stage does not run the teacher (AB, FSP: CE only after their init stage)
        teacher_fwd = 0.0
    student_step = _step_flops(vanilla, x, y, idx) / _BATCH
    total_step = _step_flops(d, x, y, idx, views) / _BATCH
    s_params = count_parameters(s_net)
    t_params = count_parameters(t_net) if t_net is not None else 0
    # the method's own parameters, trained in the main stage or in an init stage (AB's connectors, FT's
    # paraphraser)
    extra = sum(p.numel() for name, p in d.named_parameters() if p.requires_grad and d.is_method_state(name))
    info = d.describe()
    info.update(
        {
            "teacher": teacher,
            "student": student,
            "data": data,
            "input_shape": [channels, size, size],
            "num_classes": classes,
            "views": list(d.capabilities.views),
            "params": {"student": s_params, "teacher": t_params, "method_trainable": extra},
            "flops_per_image": {
                "student_forward": student_fwd,
                "teacher_forward": teacher_fwd,
                "method_forward": total_fwd - student_fwd - teacher_fwd,
                "student_train_step": student_step,
                "method_train_step": total_step - student_step - teacher_fwd,
                "total_train_step": total_step,
            },
        }
    )
    return info


def _g(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"{info['method']}: {info['teacher'] or 'no teacher'} -> {info['student']} on {info['data']} "
        f"(input {'x'.join(map(str, info['input_shape']))}, {info['num_classes']} classes)"
    ]
    if info.get("pairs"):
        lines.append("feature pairs (set R):")
        for p in info["pairs"]:
            lines.append(
                f"  teacher {p['teacher']} {tuple(p['teacher_shape'])}  <->  "
                f"student {p['student']} {tuple(p['student_shape'])}"
            )
    for side in ("teacher", "student"):
        if info.get(f"{side}_points"):
            pts = ", ".join(f"{k} {tuple(v)}" for k, v in info[f"{side}_points"].items())
            lines.append(f"{side} features read: {pts}")
    for name, n in info.get("modules", {}).items():
        lines.append(f"module {name}: {_g(n)} params")
    if info.get("init_stages"):
        lines.append(
            "init stages: " + ", ".join(f"{s['name']} ({s['epochs']} epochs)" for s in info["init_stages"])
        )
    if info.get("local_map"):
        lines.append(f"local term student map: {info['local_map']}")
    for name, c in info.get("critics", {}).items():
        lines.append(f"{name}: {_g(c['params'])} params")
        lines += [f"    {layer}" for layer in c["layers"]]
    if info.get("memory_bank"):
        b = info["memory_bank"]
        lines.append(
            f"memory banks: {b['buffers']} x {b['samples']} x {b['dim']} (buffers), "
            f"{b['negatives']} negatives per anchor"
        )
    if info.get("views"):
        lines.append(
            f"extra views of each batch: {', '.join(info['views'])} (each one more student and teacher pass, "
            "counted in the method's FLOPs)"
        )
    p = info["params"]
    lines.append(
        f"parameters: student {_g(p['student'])}, teacher {_g(p['teacher'])}, "
        f"method (trainable) {_g(p['method_trainable'])}"
    )
    f = info["flops_per_image"]
    lines.append("FLOPs per image:  forward | training step (fwd+bwd)")
    lines.append(f"  student  {_g(f['student_forward']):>9} | {_g(f['student_train_step'])}")
    lines.append(f"  teacher  {_g(f['teacher_forward']):>9} | {_g(f['teacher_forward'])} (forward only)")
    lines.append(f"  method   {_g(f['method_forward']):>9} | {_g(f['method_train_step'])}")
    lines.append(f"  total step: {_g(f['total_train_step'])}")
    return "\n".join(lines)
