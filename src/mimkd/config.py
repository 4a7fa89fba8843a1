"""Typed run configuration: YAML in, dotted ``--set`` overrides, errors that name the bad key.

A run is described by one :class:`RunConfig`. Training recipes (``cifar``, ``imagenet``, ``fashion_mnist``)
fill every optimiser/schedule field the user leaves unset; whatever the user sets wins. Method options are
validated against the chosen method's own options class (see :mod:`mimkd.distillers`), so a typo such as
``method.lamda_l`` is refused before any work starts, with the closest valid key suggested.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mimkd.errors import ConfigError, did_you_mean, unknown_name_error

__all__ = [
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "MethodConfig",
    "OptimConfig",
    "TrainConfig",
    "FinetuneConfig",
    "RECIPES",
    "load_config",
    "apply_overrides",
    "parse_override",
    "validation_message",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Which dataset, where, how much of it, and how to augment it."""

    name: str = "fashion_mnist"
    root: str | None = None
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    subset_seed: int = 0  # the subset is fixed across training seeds unless changed
    # "fraction": train on the stratified train_fraction subset; "rest": on the images that subset leaves out
    # (e.g. KDEP pre-training on the unlabelled 90 % beside a run that uses the labelled 10 %)
    train_subset: Literal["fraction", "rest"] = "fraction"
    test_fraction: float = Field(1.0, gt=0.0, le=1.0)  # < 1 only for smoke tests: reports use the full set
    image_size: int | None = Field(None, ge=4)
    augment: bool = True
    crop_padding: int | None = Field(None, ge=0)  # None: the dataset's default
    flip: bool | None = None  # None: the dataset's default
    test_batch_size: int = Field(128, ge=1)


class ModelConfig(_Strict):
    """A network: a zoo name (``resnet8x4``) or ``package.module:factory``; optional weights."""

    arch: str
    checkpoint: str | None = None
    # Explicit feature points (module paths, see mimkd.features) for every method; None: the model's declared
    # points (zoo) or those discovered by one probe batch (any other model).
    stages: list[str] | None = None
    embedding: str | None = None
    # Refuse a checkpoint that records another input shape (C, H, W) than the run's data (a teacher trained on
    # 28×28 images used on 32×32 ones); false: use it anyway.
    check_input: bool = True

    @field_validator("stages", "embedding", mode="before")
    @classmethod
    def _paths_as_strings(cls, v: Any) -> Any:
        # nn.Sequential children are named "0", "1", ...: YAML reads --set student.stages=[3,7] as numbers
        if isinstance(v, list):
            return [str(x) if isinstance(x, (int, float)) else x for x in v]
        return str(v) if isinstance(v, (int, float)) else v


class MethodConfig(BaseModel):
    """``name`` plus the method's own options (validated by the method's options class)."""

    model_config = ConfigDict(extra="allow")
    name: str = "vanilla"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


Schedule = Literal["step", "cosine", "constant"]


class OptimConfig(_Strict):
    """Optimiser, batch size, epochs and learning-rate schedule. ``None`` fields come from the recipe."""

    recipe: str | None = None  # None: chosen by dataset (see default_recipe)
    optimizer: Literal["sgd", "adamw"] | None = None
    lr: float | None = Field(None, gt=0.0)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    nesterov: bool | None = None
    weight_decay: float | None = Field(None, ge=0.0)
    batch_size: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    schedule: Schedule | None = None
    milestones: list[int] | None = None
    gamma: float | None = Field(None, gt=0.0)
    warmup_epochs: int | None = Field(None, ge=0)
    # Under torchrun, batch_size is per process (the global batch is batch_size x processes); scale_lr
    # multiplies the learning rate by the number of processes (the linear scaling rule, Goyal et al. 2017).
    scale_lr: bool = False


class TrainConfig(_Strict):
    """Loop behaviour that is not part of the optimisation recipe."""

    checkpoint_every_steps: int = Field(500, ge=1)  # besides the end of every epoch
    eval_every: int = Field(1, ge=1)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_batches: int = Field(100, ge=0)
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    # Experiment trackers that mirror metrics.jsonl (docs/trackers.md): tensorboard, mlflow, wandb.
    loggers: list[str] = Field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool | None = None  # the old spelling: false drops "tensorboard" from loggers, true adds it
    log_checkpoints: bool = False  # also store best.pt in the trackers that keep files (mlflow, wandb)
    eval_teacher: bool = True  # the teacher's test accuracy in summary.json (a check that it loaded right)
    # NHWC tensors: faster for the small CNNs on CPU (timings: results/dev_cpu_notes.md), the usual GPU win
    channels_last: bool = True
    max_steps_per_epoch: int | None = Field(None, ge=1)  # for smoke runs
    measure_latency: bool = True  # the student's single-image CPU latency in summary.json (1 / all threads)
    # Speed (see mimkd.engine.step and results/engine_options_cpu.md for what was measured on a CPU).
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: torch.autocast on the training device
    compile: bool = False  # torch.compile the student, the teacher and the method's modules
    # the uint8 training set (and its augmentation) in GPU memory; auto: when it fits in a quarter of it
    data_on_device: Literal["auto"] | bool = "auto"
    # Non-finite losses: "step" reads a flag each step (free on a CPU: no device to wait for); "deferred"
    # masks the optimiser update on the device and reads the flag at checkpoint/log boundaries only (no
    # host-device synchronisation per step); "auto": deferred on CUDA, step elsewhere.
    nonfinite_check: Literal["auto", "step", "deferred"] = "auto"
    sync_bn: bool = False  # SyncBatchNorm in the student(s) under torchrun (CUDA only in torch 2.13)
    # Every N steps: each loss term's gradient norm on the student, its ratio to CE's and its cosine with
    # CE's (mimkd.engine.term_grads; one extra backward per term on those steps only). 0: off.
    log_term_grads: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _old_tensorboard_key(cls, data: Any) -> Any:
        """``tensorboard: true/false`` (the old spelling) adds "tensorboard" to / drops from ``loggers``."""
        if not isinstance(data, dict) or data.get("tensorboard") is None:
            return data
        data = dict(data)
        names = data.get("loggers", ["tensorboard"])
        names = [names] if isinstance(names, str) else list(names or [])
        if not data.pop("tensorboard"):
            names = [n for n in names if n != "tensorboard"]
        elif "tensorboard" not in names:
            names.append("tensorboard")
        data["loggers"] = names
        return data

    @field_validator("loggers", mode="before")
    @classmethod
    def _logger_names(cls, v: Any) -> Any:
        if isinstance(v, str):  # --set train.loggers=mlflow
            v = [v]
        if not isinstance(v, list):
            return v
        from mimkd.engine.trackers import TRACKERS

        for name in v:
            if not isinstance(name, str) or name not in TRACKERS:
                raise ValueError(str(unknown_name_error("logger", str(name), TRACKERS, ConfigError)))
        return list(dict.fromkeys(v))  # each backend once, in the order given


class FinetuneConfig(_Strict):
    """Start the student from a trained checkpoint (``mimkd finetune``; see :mod:`mimkd.engine.finetune`).

    Every weight but the classifier (the student's last ``nn.Linear``) is loaded from ``checkpoint`` (a
    checkpoint file or a run directory); the classifier keeps its fresh initialisation for this dataset's
    classes. ``linear``: the backbone is frozen (no gradient, and kept in eval mode so BatchNorm statistics do
    not move), only the classifier trains. ``full``: everything trains.
    """

    checkpoint: str
    mode: Literal["linear", "full"] = "full"


class RunConfig(_Strict):
    """Everything a ``mimkd train`` / ``mimkd distill`` / ``mimkd finetune`` run needs."""

    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    deterministic: bool = False
    out_dir: str = "runs"
    name: str | None = None
    data: DataConfig = DataConfig()
    student: ModelConfig
    teacher: ModelConfig | None = None
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig | None = None  # start from a checkpoint, classifier re-initialised

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        # the run directory is OUT/NAME: a name with a separator or '..' would put it outside OUT
        if v is not None and (v.strip() in ("", ".", "..") or any(c in v for c in "/\\\0")):
            raise ValueError(
                f"{v!r} must be a plain directory name (no '/' or '..'); use --out to choose where runs go"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.optim.recipe is not None and self.optim.recipe not in RECIPES:
            raise ValueError(str(unknown_name_error("recipe", self.optim.recipe, RECIPES, ConfigError)))
        if self.finetune is not None and self.student.checkpoint:
            raise ValueError(
                "student.checkpoint and finetune.checkpoint both initialise the student: set only one "
                "(finetune.checkpoint loads every weight but the classifier)"
            )
        return self

    def resolved(self) -> RunConfig:
        """A copy with every recipe-controlled field filled in."""
        name = self.optim.recipe or default_recipe(self.data.name)
        recipe = RECIPES[name]
        values = self.optim.model_dump()
        values["recipe"] = name
        for key, default in recipe.items():
            if key == "lr_by_arch":
                continue
            if values.get(key) is None:
                values[key] = default
        if self.optim.lr is None:
            values["lr"] = recipe.get("lr_by_arch", {}).get(self.student.arch, recipe["lr"])
        if values["milestones"] is None:
            values["milestones"] = []
        return self.model_copy(update={"optim": OptimConfig(**values)})

    def run_name(self) -> str:
        if self.name:
            return self.name
        arch = self.student.arch.replace(":", "_").replace("/", "_")
        return f"{self.method.name}_{arch}_{self.data.name}_s{self.seed}"


def default_recipe(dataset: str) -> str:
    """The recipe a dataset gets when none is named: ``cifar`` for CIFAR, ``imagenet`` for ImageNet-like
    folders, ``fashion_mnist`` (the short stand-in preset) for the small datasets."""
    if dataset in ("fashion_mnist", "fashion-mnist", "mnist", "digits"):
        return "fashion_mnist"
    if dataset in ("imagenet", "tinyimagenet"):
        return "imagenet"
    return "cifar"


_SMALL_LR_ARCHS = {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}

#: Training recipes. ``cifar`` is RepDistiller's (docs/methods/vanilla.md), ``imagenet`` the standard
#: PyTorch ResNet recipe, ``fashion_mnist`` the short stand-in preset that runs on a 2-core CPU.
RECIPES: dict[str, dict[str, Any]] = {
    "cifar": dict(
        optimizer="sgd",
        lr=0.05,
        lr_by_arch=_SMALL_LR_ARCHS,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        batch_size=64,
        epochs=240,
        schedule="step",
        milestones=[150, 180, 210],
        gamma=0.1,
        warmup_epochs=0,
    ),
    "imagenet": dict(
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        batch_size=256,
        epochs=90,
        schedule="step",
        milestones=[30, 60],
        gamma=0.1,
        warmup_epochs=0,
    ),
    "fashion_mnist": dict(
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        batch_size=64,
        epochs=20,
        schedule="cosine",
        milestones=[],
        gamma=0.1,
        warmup_epochs=0,
    ),
}


# --------------------------------------------------------------------------------------------------------
# Loading, overrides, error messages


def validation_message(err: ValidationError, prefix: str = "") -> str:
    """Turn a pydantic ValidationError into lines naming each bad key and what was expected."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        if e["type"] == "extra_forbidden":
            parent_fields = _fields_at(e["loc"][:-1])
            hint = did_you_mean(str(e["loc"][-1]), parent_fields) if parent_fields else ""
            lines.append(f"{loc}: unknown key.{hint}")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required but missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = got is not None and not isinstance(got, dict) and repr(got) not in msg
            got_s = f" (got {got!r})" if shown else ""
            lines.append(f"{loc}: {msg}{got_s}")
    return "invalid configuration: " + "; ".join(lines)  # one line: the CLI prints it as one error line


def _fields_at(loc: tuple) -> list[str]:
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None)
        if args:
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        model = ann
    return list(getattr(model, "model_fields", {}))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.1'`` -> (['optim', 'lr'], 0.1). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e})") from None
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads '1e-3' (no dot) as a string
    return key.split("."), value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


#: The sections of a run configuration and one key of each, for the error that refuses a section that is not
#: a mapping of keys (``optim: 5`` would otherwise be replaced by the flags' keys, or fail obscurely).
SECTIONS: dict[str, tuple[str, str]] = {
    "data": ("train_fraction", "0.1"),
    "student": ("arch", "resnet8x4"),
    "teacher": ("checkpoint", "teacher.pt"),
    "method": ("name", "kd"),
    "optim": ("lr", "0.1"),
    "train": ("eval_every", "1"),
    "finetune": ("checkpoint", "run/last.pt"),
}
_NULLABLE = ("teacher", "finetune")  # null: no teacher, no fine-tuning


def _show(value: Any) -> str:
    if value is None:
        return "an empty section"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def section_error(where: str, key: str, value: Any, as_flag: bool = False) -> ConfigError:
    """The one-line error for section ``key`` holding ``value`` (not a mapping), with an example of one."""
    sub, example = SECTIONS[key]
    eg = f"--set {key}.{sub}={example}" if as_flag else f"{key}: {{{sub}: {example}}}"
    return ConfigError(f"{where}: section {key!r} must be a mapping of keys (e.g. {eg}), got {_show(value)}")


def check_sections(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """A shallow copy of ``data`` whose sections are all mappings: an empty (null) section is dropped (its
    defaults apply; ``teacher``/``finetune``: none); any other non-mapping raises :func:`section_error`."""
    out = dict(data)
    for key in SECTIONS:
        if key not in out or isinstance(out[key], dict):
            continue
        if out[key] is None and key != "student":
            if key not in _NULLABLE:
                del out[key]
            continue
        raise section_error(where, key, out[key])
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``KEY=VALUE`` overrides to a nested dict (creating intermediate dicts)."""
    for text in overrides:
        path, value = parse_override(text)
        if (
            len(path) == 1
            and path[0] in SECTIONS
            and not isinstance(value, dict)
            and (value is not None or path[0] == "student")  # null: the section's defaults (or none)
        ):
            raise section_error(f"--set {text!r}", path[0], value, as_flag=True)
        node = data
        for depth, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                if depth == 0 and part in SECTIONS:
                    raise section_error(f"--set {text!r}", part, nxt, as_flag=True)
                raise ConfigError(f"--set {text!r}: {part!r} holds {_show(nxt)}, not a mapping of keys")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def build_config(data: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig` (method options included), or raise ConfigError."""
    data = check_sections(data)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e)) from None
    from mimkd.distillers.registry import validate_options

    validate_options(cfg.method.name, cfg.method.options)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Merge ``base`` (e.g. from CLI flags), the YAML file at ``path`` and ``overrides``, then validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = check_sections(read_yaml(path), f"config file {str(path)!r}")
    if base:
        data = _deep_merge(data, copy.deepcopy(base))
    apply_overrides(data, overrides or [])
    return build_config(data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any], _at: str = "") -> dict[str, Any]:
    """``b`` merged into ``a`` (``b`` wins); a value of ``a`` that ``b`` gives keys for is refused, not
    silently replaced by them."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, f"{_at}{k}.")
        elif isinstance(v, dict) and out.get(k) is not None:
            if not _at and k in SECTIONS:
                raise section_error("config", k, out[k])
            raise ConfigError(f"config: {_at}{k} holds {_show(out[k])}, not a mapping of keys")
        else:
            out[k] = v
    return out
