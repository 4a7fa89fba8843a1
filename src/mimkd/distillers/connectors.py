"""Parts shared by the baselines with connectors or init stages (docs/methods/: fitnets, ab, ft, fsp).

* :class:`ConvReg`: RepDistiller's regressor from a student map to a teacher map's shape (FitNets' hint
  regressor with ReLU; AB's connector without): ``conv3×3 s2 p1`` if ``H_s = 2H_t``, ``ConvTranspose 4×4 s2
  p1`` if ``2H_s = H_t``, ``conv (1+H_s−H_t)×(1+W_s−W_t)`` if ``H_s ≥ H_t``; then BN, then ReLU (optional);
  ``C_t`` output channels.
* :func:`modules_up_to`: the modules of ANY network whose forward has finished by the time given hook points
  are produced (found with hooks in one probe pass): what an init stage trains of the student ("the student's
  feature modules", FitNets' "modules up to the hint").
* :func:`label_terms`: the main-stage loss ``γ·CE + α·KD`` of the init-only methods (AB, FSP, two-stage
  FitNets), which run no feature tap at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mimkd.errors import MethodError
from mimkd.features import parse_point, probe_forward

from .kd import kd_loss

__all__ = ["ConvReg", "modules_up_to", "label_terms", "without_prefixes"]


class ConvReg(nn.Module):
    """Map a ``C_s×H_s×W_s`` student map to the teacher's ``C_t×H_t×W_t`` (docs/methods/fitnets.md).

    Args:
        s_shape, t_shape: ``(C, H, W)`` of the student and the teacher map (no batch dimension).
        use_relu: end with a ReLU (FitNets) or not (AB's connector).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise MethodError(
                f"ConvReg needs two feature maps (C, H, W); got student {tuple(s_shape)}, "
                f"teacher {tuple(t_shape)}"
            )
        s_c, s_h, s_w = (int(v) for v in s_shape)
        t_c, t_h, t_w = (int(v) for v in t_shape)
        sizes = f"student {s_c}x{s_h}x{s_w}, teacher {t_c}x{t_h}x{t_w}"
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
            out_w = (s_w - 1) // 2 + 1
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
            out_w = 2 * s_w
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
            out_w = t_w
        else:
            raise MethodError(
                f"ConvReg cannot map the student map to the teacher map ({sizes}): it handles H_s = 2·H_t, "
                "2·H_s = H_t, or H_s ≥ H_t and W_s ≥ W_t. Choose other feature layers."
            )
        if out_w != t_w:
            raise MethodError(
                f"ConvReg cannot map the student map to the teacher map ({sizes}): the widths do not follow "
                f"the heights (output width would be {out_w}). Choose other feature layers."
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def modules_up_to(
    model: nn.Module, points: Sequence[str], sample_input: Tensor
) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that run up to ``points`` (hook-point syntax of :class:`FeatureTap`).

    One probe forward pass (eval mode, no grad) records when each module's forward starts and finishes and
    when each point is produced (a module's output, or ``"path:input"``: the moment ``path`` starts). The
    result is the outermost modules, in execution order, whose forward finished no later than the last of the
    points: everything the points depend on, whatever the architecture (a container still running then, e.g.
    the stage holding the point's block or the model itself, is replaced by its finished children).
    """
    named = dict(model.named_modules())
    started: dict[str, int] = {}
    finished: dict[str, int] = {}
    produced: dict[str, int] = {}
    clock = iter(range(1, 1 << 62))
    handles = []

    def record(table: dict[str, int], key: str):
        def hook(*_):
            table.setdefault(key, next(clock))

        return hook

    # module hooks first: a point's own module then counts as finished when its output is produced
    for name, module in named.items():
        handles.append(module.register_forward_pre_hook(record(started, name)))
        handles.append(module.register_forward_hook(record(finished, name)))
    for point in points:
        path, is_input = parse_point(point)
        if path not in named:
            raise MethodError(f"feature point {point!r}: {type(model).__name__} has no module {path!r}")
        if is_input:
            handles.append(named[path].register_forward_pre_hook(record(produced, point)))
        else:
            handles.append(named[path].register_forward_hook(record(produced, point)))
    probe_forward(model, sample_input, handles)
    missing = [p for p in points if p not in produced]
    if missing:
        raise MethodError(
            f"feature point(s) {missing} did not run in a forward pass of {type(model).__name__}"
        )
    cutoff = max(produced.values())
    done = {n for n, t in finished.items() if t <= cutoff}

    def parent(name: str) -> str | None:
        return None if not name else (name.rsplit(".", 1)[0] if "." in name else "")

    outer = sorted((n for n in done if parent(n) not in done), key=started.__getitem__)
    return [(n, named[n]) for n in outer]


def label_terms(distiller, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``γ·CE + α·KD`` only: the main stage of AB, FSP and two-stage FitNets (the teacher runs if α > 0)."""
    o = distiller.options
    logits = distiller.student(images)
    terms: dict[str, Tensor] = {}
    if o.ce_weight:
        terms["ce"] = o.ce_weight * distiller.cross_entropy(logits, labels)
    if o.kd_weight:
        t_logits, _ = distiller.teacher_outputs(images)
        terms["kd"] = o.kd_weight * kd_loss(logits, t_logits, o.kd_temperature)
    return logits, terms


def without_prefixes(named_params, prefixes: Sequence[str]):
    """Filter ``(name, parameter)`` pairs: drop those of the modules named in ``prefixes`` (init-only parts
    that the main optimiser must not update)."""
    for name, p in named_params:
        if not any(name.startswith(f"{prefix}.") for prefix in prefixes):
            yield name, p
