"""From a :class:`~mimkd.config.RunConfig` to a running :class:`~mimkd.engine.trainer.Trainer`.

This is the one place that turns names into objects: dataset, student, teacher (with its checkpoint),
distiller, augmentation, device. ``mimkd train`` and ``mimkd distill`` both call :func:`run`, which also
starts the process group when ``torchrun`` launched several processes (:mod:`mimkd.engine.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimkd.checkpoint import DiskFullError, load_checkpoint, load_weights
from mimkd.config import ModelConfig, RunConfig
from mimkd.data import BatchAugment, ImageDataset, dataset_spec, load_dataset, stratified_subset
from mimkd.distillers import build_distiller
from mimkd.distillers.base import Distiller
from mimkd.errors import CheckpointError, ConfigError, MimkdError
from mimkd.evaluation.flops import count_flops, count_parameters
from mimkd.features import FeatureTap, feature_points_of
from mimkd.models import FeaturePoints, build_network
from mimkd.teachers import resolve_teacher

from . import distributed
from .distributed import DistInfo, evaluate_sharded
from .identity import teacher_identity
from .preflight import probe_distiller, probe_network
from .rundir import Resume, claimed
from .trainer import StudentInfo, Trainer

__all__ = ["resolve_device", "build_network", "load_teacher", "load_data", "prepare", "run", "Prepared"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available here; use --device cpu")
    return dev


def load_teacher(
    arch: str | None,
    checkpoint: str,
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None = None,
    check_input: bool = True,
) -> tuple[nn.Module, str]:
    """Build the teacher and load its weights strictly. ``arch`` may be omitted for mimkd checkpoints.

    When the checkpoint records the input it was trained on (every mimkd checkpoint does) and that differs
    from ``input_shape`` (C, H, W of the run's data), the teacher is refused unless ``check_input`` is False.
    """
    ck = load_checkpoint(checkpoint)
    if arch is None:
        arch = ck.get("arch") if isinstance(ck.get("arch"), str) else None
        if arch is None:
            raise ConfigError(
                f"teacher checkpoint {checkpoint!r} does not record its architecture: pass --teacher-arch "
                "(e.g. --teacher-arch resnet32x4)"
            )
    recorded = (ck.get("input") or {}).get("shape") if isinstance(ck.get("input"), dict) else None
    if check_input and input_shape is not None and recorded and list(recorded) != list(input_shape):
        c, h, w = recorded
        raise ConfigError(
            f"teacher {checkpoint!r} was trained on {c}×{h}×{w} images, this run's data is "
            f"{'×'.join(str(x) for x in input_shape)}: resize the data with --image-size {h}, or pass --set "
            "teacher.check_input=false to use it on these images anyway"
        )
    net = build_network(arch, num_classes, in_channels)
    load_weights(net, checkpoint, arch)
    return net, arch


def load_data(cfg: RunConfig) -> tuple[ImageDataset, ImageDataset, Any]:
    """Train/test datasets (train subset by ``train_fraction``) and the training augmentation."""
    d = cfg.data
    train = load_dataset(d.name, d.root, split="train", image_size=d.image_size)
    test = load_dataset(d.name, d.root, split="test", image_size=d.image_size)
    if d.train_subset == "rest":
        if d.train_fraction >= 1.0:
            raise ConfigError(
                "data.train_subset=rest takes the images a data.train_fraction < 1 subset leaves out; with "
                "train_fraction=1 nothing is left: set data.train_fraction (e.g. 0.1)"
            )
        chosen = stratified_subset(train.labels, d.train_fraction, d.subset_seed)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[chosen] = False
        train = train.subset(keep.nonzero().flatten())
    elif d.train_fraction < 1.0:
        train = train.subset(stratified_subset(train.labels, d.train_fraction, d.subset_seed))
    if d.test_fraction < 1.0:
        test = test.subset(stratified_subset(test.labels, d.test_fraction, d.subset_seed))
    if d.augment:
        augment = dataset_spec(d.name).augment(train.mean, train.std, train.image_shape[1], flip=d.flip)
        if d.crop_padding is not None:
            augment.crop_padding = d.crop_padding
    else:
        augment = BatchAugment(train.mean, train.std)
    return train, test, augment


def override_points(net: nn.Module, spec: ModelConfig, sample: torch.Tensor) -> None:
    """Attach the feature points named in the config (``stages``/``embedding``) to ``net``; the rest of the
    points stay as declared or discovered. Unknown module paths are refused, with suggestions."""
    if spec.stages is None and spec.embedding is None:
        return
    base = feature_points_of(net, sample)
    stages = tuple(spec.stages) if spec.stages is not None else base.stages
    points = FeaturePoints(
        stages=stages,
        preact=(None,) * len(stages) if spec.stages is not None else base.preact,
        embedding=spec.embedding or base.embedding,
        has_stem=False if spec.stages is not None else base.has_stem,
    )
    FeatureTap(net, [*points.stages, points.embedding]).remove()  # validates the module paths
    net.feature_points = points


@dataclass
class Prepared:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    train: ImageDataset
    test: ImageDataset
    augment: Any
    distiller: Distiller
    student_arch: str
    teacher_arch: str | None
    summary_extra: dict[str, Any]


def prepare(
    cfg: RunConfig, dist_info: DistInfo | None = None, device: torch.device | None = None
) -> Prepared:
    """Build everything a run needs (no training yet). ``dist_info``/``device``: this process's place in a
    distributed run and its device (default: a single process on ``cfg.device``)."""
    cfg = cfg.resolved()
    info = dist_info if dist_info is not None else distributed.SINGLE
    device = device if device is not None else resolve_device(cfg.device)
    sync_bn = distributed.check_sync_bn(cfg.train.sync_bn, device, info)
    if device.type == "cuda":  # cuDNN autotuning (fixed input shapes) unless the run asks to be deterministic
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, test, augment = load_data(cfg)
    num_classes, in_channels = train.num_classes, train.image_shape[0]
    if len(train) < cfg.optim.batch_size * info.world_size:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} × {info.world_size} process(es) is larger than the "
            f"training set ({len(train)} images): use a smaller --batch-size"
        )
    student = build_network(cfg.student.arch, num_classes, in_channels)
    if cfg.student.checkpoint:
        load_weights(student, cfg.student.checkpoint, cfg.student.arch)
    if sync_bn:  # before any feature tap is attached (conversion replaces the BatchNorm modules)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    finetune: dict[str, Any] | None = None
    if cfg.finetune is not None:  # mimkd finetune: all weights but the classifier; linear mode freezes
        from .finetune import init_student

        finetune = init_student(student, cfg.finetune, cfg.student.arch, in_channels)
    sample = augment(train.images[: min(8, len(train))], torch.Generator().manual_seed(0))
    probe_network(student, sample, num_classes, "student", cfg.student.arch)
    override_points(student, cfg.student, sample)
    teacher, teacher_arch, identity = None, None, None
    if cfg.teacher is not None and cfg.teacher.checkpoint:
        arch = cfg.teacher.arch if cfg.teacher.arch not in ("", "auto") else None
        checkpoint, arch = resolve_teacher(cfg.teacher.checkpoint, arch)  # a name: fetched (docs/teachers.md)
        teacher, teacher_arch = load_teacher(
            arch,
            checkpoint,
            num_classes,
            in_channels,
            input_shape=tuple(train.image_shape),
            check_input=cfg.teacher.check_input,
        )
        probe_network(teacher, sample, num_classes, "teacher", teacher_arch)
        override_points(teacher, cfg.teacher, sample)
        identity = teacher_identity(teacher, teacher_arch, checkpoint)
    elif cfg.teacher is not None:
        raise ConfigError("teacher.checkpoint: a teacher needs trained weights (--teacher PATH)")
    options = dict(cfg.method.options)
    distiller = build_distiller(
        cfg.method.name,
        student,
        teacher,
        sample,
        num_classes=num_classes,
        train_labels=train.labels,
        student_arch=cfg.student.arch,
        build_network=lambda arch: _maybe_sync_bn(build_network(arch, num_classes, in_channels), sync_bn),
        **options,
    )
    if distiller.offline_ready():  # (KDEP's forward needs its offline pass first)
        probe_distiller(distiller, train, augment, cfg.optim.batch_size, distiller.uses_labels)
    if sync_bn:  # the method's own modules too (e.g. MIMKD's projection heads hold a BatchNorm1d)
        distiller.convert_method_parts(nn.SyncBatchNorm.convert_sync_batchnorm)
    extra: dict[str, Any] = {
        "data": cfg.data.name,
        "train_images": len(train),
        "test_images": len(test),
        "student_params": count_parameters(student),
        "student_flops_per_image": count_flops(student, sample[:1]),
        "method_params": sum(p.numel() for _, p in distiller.trainable_named_parameters())
        - count_parameters(student, trainable_only=True),
    }
    if finetune is not None:
        extra["finetune"] = finetune
    if teacher is not None:
        extra["teacher"] = teacher_arch
        extra["teacher_params"] = count_parameters(teacher)
        extra["teacher_identity"] = identity
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    return Prepared(
        cfg, run_dir, device, train, test, augment, distiller, cfg.student.arch, teacher_arch, extra
    )


def _maybe_sync_bn(net: nn.Module, sync_bn: bool) -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync_bn else net


def run(cfg: RunConfig, resume: Resume = False, overwrite: bool = False) -> dict[str, Any]:
    """Prepare and train; returns the run summary (on every rank of a torchrun launch).

    ``resume``: True continues the run in its directory (refused when there is nothing to continue),
    ``"auto"`` continues it when it has a checkpoint and starts it otherwise; ``overwrite`` starts it over
    (the old run is kept until the new one has made progress: :mod:`mimkd.engine.rundir`)."""
    with distributed.session(cfg.device) as (info, device):
        p = prepare(cfg, info, device)  # everything is built and probed before the directory is touched
        with claimed(p.run_dir, p.cfg.model_dump(mode="json"), resume, overwrite, info):
            try:
                return _train(p, info, resume=bool(resume))
            except OSError as e:
                if DiskFullError.is_full(e):
                    raise DiskFullError.of(e, p.run_dir) from None
                raise


def _train(p: Prepared, info: DistInfo, resume: bool) -> dict[str, Any]:
    if p.distiller.teacher is not None and p.cfg.train.eval_teacher:
        fmt = torch.channels_last if p.cfg.train.channels_last else torch.contiguous_format
        p.distiller.teacher.to(device=p.device, memory_format=fmt)
        res = evaluate_sharded(p.distiller.teacher, p.test, p.cfg.data.test_batch_size, p.device, fmt)
        p.summary_extra["teacher_test_top1"] = res["top1"]
    student = StudentInfo(p.student_arch, p.train.num_classes, p.train.image_shape[0])
    trainer = Trainer(
        p.cfg,
        p.distiller,
        p.train,
        p.test,
        p.run_dir,
        p.device,
        student,
        p.augment,
        extra_summary=p.summary_extra,
        dist_info=info,
    )
    return trainer.fit(resume=resume)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, (MimkdError, CheckpointError))
