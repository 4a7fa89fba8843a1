"""FeatureTap: capture named intermediate values of ANY ``nn.Module`` with forward hooks.

Points are given by module path:

* ``"layer2"`` — the output of module ``layer2``;
* ``"fc:input"`` — the first positional input of module ``fc`` (the pre-classifier vector of most networks).

Without explicit points, a zoo model's declared :class:`~mimkd.models.registry.FeaturePoints` are used; a
foreign model is probed once (:func:`discover_points`): the stage outputs are the last module (in execution
order) at each spatial resolution, and the embedding is the input of the last ``nn.Linear`` that runs.

Capture is scoped: the hooks record only inside :meth:`FeatureTap.capture` (``tap.run(x)`` opens it for one
forward pass). Outside it (evaluation, export, a user's own forward) they return at once and hold nothing,
and a network carrying a tap compiles like any other (``train.compile``; dynamo keeps one graph with
recording on and one with it off).

A captured tensor must still hold the value it had at its hook point when it is read. An in-place operation
after the hook point (``nn.ReLU(inplace=True)`` right after a hooked BatchNorm, ``out += identity``) would
silently change it; the tap records each tensor's version counter and raises if it moved, naming the point.
Inside a compiled network the counters are not recorded (the compiler reproduces eager semantics, and every
tap's points are checked eagerly when a distiller probes them at construction).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from mimkd.errors import ModelError, did_you_mean
from mimkd.models.registry import FeaturePoints

__all__ = [
    "FeatureTap",
    "FeatureSpec",
    "discover_points",
    "feature_points_of",
    "pair_by_size",
    "parse_point",
    "probe_forward",
]


@dataclass(frozen=True)
class FeatureSpec:
    """Shape information of one captured point (no batch dimension)."""

    name: str
    shape: tuple[int, ...]

    @property
    def is_map(self) -> bool:
        return len(self.shape) == 3

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[int, int] | None:
        return (self.shape[1], self.shape[2]) if self.is_map else None

    def vector_dim(self, owner: str, who: str) -> int:
        """Length of this point as a vector (a ``C×1×1`` map counts as one); a larger map is refused with an
        error naming ``owner`` (the method) and ``who`` (teacher or student)."""
        if self.is_map and self.shape[1:] != (1, 1):
            raise ModelError(
                f"{owner}: the {who} embedding point {self.name!r} is a map {self.shape}, not a vector"
            )
        n = 1
        for d in self.shape:
            n *= d
        return n


def parse_point(point: str) -> tuple[str, bool]:
    """``"path:input"`` → ``("path", True)``; ``"path"`` or ``"path:output"`` → ``("path", False)``."""
    if point.endswith(":input"):
        return point[: -len(":input")], True
    if point.endswith(":output"):
        return point[: -len(":output")], False
    return point, False


class FeatureTap:
    """Forward hooks on ``model`` that record the values at ``points`` on every forward pass.

    Args:
        model: any module.
        points: hook points (see module docstring). ``None``: the model's declared feature points (zoo
            models), otherwise the points found by :func:`discover_points` (needs ``sample_input``).
        sample_input: a probe batch, only needed to discover the points of a model that declares none.

    Use ``logits, feats = tap.run(x)`` (or ``tap(x)``), or run the model yourself inside ``with
    tap.capture():`` and read ``tap.features`` (an ordered ``{point: tensor}``). The values of the last
    capture stay readable until the next one or :meth:`clear`. ``tap.remove()`` detaches the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        points: Sequence[str] | None = None,
        sample_input: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        if points is None:
            fp = feature_points_of(model, sample_input)
            points = [*fp.stages, *(p for p in fp.preact if p), fp.embedding]
        self.points: list[str] = list(OrderedDict.fromkeys(points))
        self._values: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int | None] = {}
        self._active = False
        modules = dict(model.named_modules())
        by_module: dict[str, list[tuple[str, bool]]] = {}
        for point in self.points:
            path, is_input = parse_point(point)
            if path not in modules:
                raise ModelError(
                    f"feature point {point!r}: {type(model).__name__} has no module {path!r}."
                    f"{did_you_mean(path, [n for n in modules if n])} "
                    "Module paths are the names printed by model.named_modules()."
                )
            by_module.setdefault(path, []).append((point, is_input))
        for path, entries in by_module.items():
            module = modules[path]
            for point, is_input in entries:
                if is_input:
                    module.register_forward_pre_hook(_Capture(self, point, is_input=True))
                else:
                    module.register_forward_hook(_Capture(self, point, is_input=False))

    def __deepcopy__(self, memo: dict) -> FeatureTap:
        """A copy (made with a copy of its model) that holds no captured values: those belong to the last
        forward pass of the original and may be non-leaf tensors, which cannot be copied."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key in ("_values", "_versions"):
                new.__dict__[key] = {}
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def _store(self, point: str, value) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"feature point {point!r} produced {type(value).__name__}, not a tensor")
        self._values[point] = value
        # dynamo would trace the counter as a constant: a compiled network is checked eagerly at probe time
        self._versions[point] = None if torch.compiler.is_compiling() else value._version

    @contextmanager
    def capture(self) -> Iterator[FeatureTap]:
        """Record the points during the forward passes run inside this block (the previous values are
        cleared on entry); outside it the hooks record nothing."""
        self.clear()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    @property
    def features(self) -> OrderedDict[str, torch.Tensor]:
        """The values captured by the last forward pass, in point order."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for point in self.points:
            if point not in self._values:
                raise ModelError(
                    f"feature point {point!r} did not run in the last forward pass (is the module used?)"
                )
            value = self._values[point]
            version = self._versions[point]
            if version is not None and value._version != version:
                raise ModelError(
                    f"feature point {point!r} was modified in place after it was captured (an in-place "
                    "operation such as ReLU(inplace=True) or '+=' follows it). Hook a later module, or make "
                    "that operation out-of-place."
                )
            out[point] = value
        return out

    def clear(self) -> None:
        self._values.clear()
        self._versions.clear()

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, OrderedDict[str, torch.Tensor]]:
        """Forward ``x`` through the model inside one :meth:`capture`; return its output and the features."""
        with self.capture():
            out = self.model(x)
        return out, self.features

    __call__ = run

    def remove(self) -> None:
        """Detach this tap's hooks from the model (in a deep copy of the model, the copy's own tap's)."""
        for module in self.model.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, h in hooks.items() if isinstance(h, _Capture) and h.tap is self]:
                    del hooks[key]

    def specs(self, sample_input: torch.Tensor) -> list[FeatureSpec]:
        """Shapes of every point for ``sample_input`` (runs one forward pass in eval mode, no grad)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                _, feats = self.run(sample_input)
        finally:
            self.model.train(was_training)
        return [FeatureSpec(k, tuple(v.shape[1:])) for k, v in feats.items()]


class _Capture:
    """The hook that stores one point's value in its tap. An object rather than a closure, so that a deep copy
    of a tapped model (``copy.deepcopy`` of a distiller) captures into the copied tap, not the original."""

    def __init__(self, tap: FeatureTap, point: str, is_input: bool) -> None:
        self.tap, self.point, self.is_input = tap, point, is_input

    def __call__(self, module: nn.Module, inputs, output=None) -> None:
        if not self.tap._active:  # outside FeatureTap.capture: evaluation, export, a plain forward
            return
        if self.is_input:
            self.tap._store(self.point, inputs[0] if inputs else None)
        else:
            self.tap._store(self.point, output)


def probe_forward(model: nn.Module, sample_input: torch.Tensor, handles: Iterable = ()) -> None:
    """One eval-mode, no-grad forward pass of ``model`` (for hooks to observe); the model's mode is restored
    and ``handles`` (the probe's hooks) are removed afterwards, even on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def feature_points_of(model: nn.Module, sample_input: torch.Tensor | None = None) -> FeaturePoints:
    """The declared feature points of a zoo model, else those discovered by one probe batch."""
    declared = getattr(model, "feature_points", None)
    if isinstance(declared, FeaturePoints):
        return declared
    if sample_input is None:
        raise ModelError(
            f"{type(model).__name__} declares no feature points: pass sample_input (a probe batch) so they "
            "can be discovered, or give the points explicitly"
        )
    return discover_points(model, sample_input)


def discover_points(model: nn.Module, sample_input: torch.Tensor) -> FeaturePoints:
    """Find the stage outputs and the embedding of an arbitrary model with one probe forward pass.

    Stage outputs: for each spatial resolution (H, W) > 1×1 met by a 4-D output, the module whose forward
    finished last while producing that resolution (containers finish after their children, so a stage's
    ``nn.Sequential`` wins over its last block). Maps are ordered by first appearance. Embedding: the input of
    the last ``nn.Linear`` to run; if none runs, the output of the last module producing a 2-D tensor.
    No stem is assumed (every discovered map is a candidate).
    """
    events: list[tuple[str, tuple[int, ...]]] = []
    linears: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                events.append((name, tuple(output.shape)))
            if isinstance(mod, nn.Linear):
                linears.append(name)

        handles.append(module.register_forward_hook(hook))
    probe_forward(model, sample_input, handles)

    last_at: OrderedDict[tuple[int, int], str] = OrderedDict()
    for name, shape in events:
        if len(shape) == 4 and (shape[2], shape[3]) != (1, 1):
            key = (shape[2], shape[3])
            last_at[key] = name  # first appearance fixes the order, later modules overwrite the name
    if not last_at:
        raise ModelError(
            f"could not discover feature maps of {type(model).__name__}: no module produced a 4-D tensor"
        )
    if linears:
        embedding = f"{linears[-1]}:input"
    else:
        vectors = [n for n, s in events if len(s) == 2]
        if not vectors:
            raise ModelError(
                f"could not discover the embedding of {type(model).__name__}: give it explicitly"
            )
        embedding = vectors[-1]
    stages = tuple(last_at.values())
    return FeaturePoints(stages=stages, preact=(None,) * len(stages), embedding=embedding, has_stem=False)


def pair_by_size(
    teacher_maps: Iterable[FeatureSpec], student_maps: Iterable[FeatureSpec]
) -> list[tuple[FeatureSpec, FeatureSpec]]:
    """MIMKD's set R (docs/methods/mimkd.md): for every spatial size present in both lists, the deepest map
    of that size on each side; pairs ordered shallow to deep (by the student's order)."""

    def deepest(maps: Iterable[FeatureSpec]) -> OrderedDict[tuple[int, int], FeatureSpec]:
        out: OrderedDict[tuple[int, int], FeatureSpec] = OrderedDict()
        for spec in maps:
            if spec.is_map:
                if spec.spatial in out:
                    del out[spec.spatial]
                out[spec.spatial] = spec
        return out

    t, s = deepest(teacher_maps), deepest(student_maps)
    return [(t[size], s[size]) for size in s if size in t]
