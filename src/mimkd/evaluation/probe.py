"""Linear-probe transfer: ``mimkd probe`` (the protocol of the MIMKD paper's Table 3).

The student is frozen; its pre-classifier features — the input of its final ``nn.Linear``, the one that runs
last in a forward pass (``feat[-1]`` in RepDistiller's terms, 128-d for WRN-16-2) — are extracted once for
the train and test splits of another dataset, and one ``nn.Linear`` trained on the cached training features
is evaluated on the test features (top-1, %).

How the probe dataset is adapted to the student (our choice, after CRD's protocol):

* **size**: images are resized to the student's training image size — the run's ``data.image_size``, else
  the native size of the dataset it was trained on (32 for CIFAR students, so STL-10 96→32 and TinyImageNet
  64→32) — with :func:`mimkd.data.dataset.resize_images` (bilinear, antialiased when shrinking);
* **channels**: RGB→grey by ITU-R 601 luminance ``0.299 R + 0.587 G + 0.114 B`` (what PIL's ``"L"`` mode
  does) for a 1-channel student, grey→RGB by replication for a 3-channel one;
* **normalisation**: the STUDENT's training normalisation (CIFAR-100 statistics for a CIFAR-100 student),
  not the probe dataset's own; for datasets whose statistics are computed from the training images (digits,
  folder trees) the student's training split is loaded to compute them, as training did;
* no augmentation; the full test split.

Linear classifier ([PROPOSAL]; the paper does not state it): ``nn.Linear(feature_dim, classes)`` initialised
at zero (the probe is a convex problem, so zero is a neutral start and leaves the seed only the minibatch
order), plain SGD with momentum 0.9, weight decay 5e-4 (the CIFAR recipes' value; 0 is allowed), batch 256
(the last, smaller batch of an epoch kept), lr 0.1 decayed ×0.1 at 60 % and 80 % of the epochs (100 epochs →
milestones 60 and 80), cross-entropy on the raw (unstandardised) features. Minibatch order comes from a
:class:`torch.Generator` seeded with ``seed``, so a probe on CPU is bit-for-bit deterministic for a seed.

The result is a dict (written by :func:`write_probe_result` as JSON beside the checkpoint by the CLI):
``dataset, checkpoint, arch, feature_dim, train_images, test_images, epochs, lr, train_top1, test_top1,
seconds`` plus the protocol details (``image_size``, ``mean``, ``std``, ``weight_decay``, ...).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkd.data import ImageDataset, dataset_spec, eval_batches, load_dataset, stratified_subset
from mimkd.errors import CheckpointError, DataError, MimkdError, ModelError
from mimkd.features import FeatureTap, probe_forward

__all__ = [
    "LUMA",
    "linear_probe",
    "write_probe_result",
    "resolve_checkpoint_file",
    "load_frozen_student",
    "student_input_spec",
    "classifier_input",
    "adapt_images",
    "probe_milestones",
    "default_output",
    "register_cli",
]

#: ITU-R 601 luminance weights for RGB→grey.
LUMA = (0.299, 0.587, 0.114)
#: The lr is multiplied by ``GAMMA`` at these fractions of the epochs.
MILESTONE_FRACTIONS = (0.6, 0.8)
GAMMA = 0.1
MOMENTUM = 0.9


# -- the student ------------------------------------------------------------------------------------------
def resolve_checkpoint_file(path: str | Path) -> Path:
    """``path`` itself when it is a file; in a run directory ``last.pt`` (``best.pt`` when there is no
    ``last.pt``). Pass ``RUN/best.pt`` to probe the best epoch."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist: pass a mimkd checkpoint file or a run directory"
        )
    if p.is_dir():
        for name in ("last.pt", "best.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"{str(p)!r} is a directory without last.pt or best.pt: not a mimkd run directory, or the run "
            "has not finished an epoch yet"
        )
    return p


def load_frozen_student(path: str | Path) -> tuple[nn.Module, dict[str, Any], str]:
    """Rebuild the architecture a mimkd checkpoint records (a zoo name or ``module:factory``), load its
    weights strictly, freeze it (eval mode, no gradients). Returns ``(network, checkpoint dict, arch)``."""
    from mimkd.engine.checkpoint import extract_state_dict, load_checkpoint, load_weights
    from mimkd.models import build_network

    try:
        ck = load_checkpoint(path)
    except MimkdError:
        raise
    except Exception as e:  # torch's weights-only unpickler raises e.g. IndexError on some non-PyTorch files
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: it is not a PyTorch file ({type(e).__name__}: "
            f"{str(e)[:160]}). Pass a mimkd checkpoint (.pt) or a run directory"
        ) from None
    extract_state_dict(ck, str(path))  # raises when it holds no model weights
    arch, classes, channels = ck.get("arch"), ck.get("num_classes"), ck.get("in_channels")
    if not isinstance(arch, str) or arch in ("", "?") or not isinstance(classes, int):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a mimkd checkpoint: it does not record its architecture and "
            "class count ('arch', 'num_classes'), so the student cannot be rebuilt. Probe a checkpoint "
            "written by mimkd train / distill / finetune (or its run directory)"
        )
    if not isinstance(channels, int):
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not record the student's input channels ('in_channels'): probe a "
            "checkpoint written by mimkd train / distill / finetune (or its run directory)"
        )
    try:
        net = build_network(arch, classes, channels)
    except ModelError as e:
        raise ModelError(f"checkpoint {str(path)!r} holds architecture {arch!r}: {e}") from None
    ck = load_weights(net, path, arch)
    net.eval()
    net.requires_grad_(False)
    return net, ck, arch


def _run_config(path: Path, ck: dict[str, Any]) -> dict[str, Any]:
    """The run configuration stored in the checkpoint, else ``config.yaml`` beside it, else ``{}``."""
    cfg = ck.get("config")
    if isinstance(cfg, dict):
        return cfg
    cfg_file = path.parent / "config.yaml"
    if cfg_file.is_file():
        import yaml

        try:
            loaded = yaml.safe_load(cfg_file.read_text())
        except (OSError, yaml.YAMLError):
            loaded = None
        if isinstance(loaded, dict):
            return loaded
    return {}


def student_input_spec(
    path: str | Path,
    ck: dict[str, Any],
    in_channels: int,
    *,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[int, tuple[float, ...], tuple[float, ...], str | None]:
    """The student's training input: ``(image_size, mean, std, training dataset name)``.

    Read from the checkpoint's ``input`` record when it has one (shape, mean, std: checkpoints of current
    runs), otherwise from the run configuration it holds (``data.name``, ``data.root``, ``data.image_size``);
    the given ``image_size``/``mean``/``std`` win. Statistics computed from training images (digits, folder
    trees) are recomputed by loading that training split, as the run did.
    """
    recorded = ck.get("input") if isinstance(ck.get("input"), dict) else {}
    if recorded.get("mean") is not None and recorded.get("std") is not None:  # the checkpoint says it all
        mean = mean if mean is not None else tuple(recorded["mean"])
        std = std if std is not None else tuple(recorded["std"])
        if image_size is None and recorded.get("shape"):
            image_size = int(recorded["shape"][-1])
    data = _run_config(Path(path), ck).get("data") or {}
    name = data.get("name") if isinstance(data.get("name"), str) else None
    spec = None
    if name is not None:
        try:
            spec = dataset_spec(name)
        except MimkdError:
            spec = None
    need = "--image-size" if image_size is None else ""
    if mean is None or std is None:
        need = f"{need} --mean/--std".strip()
    if spec is None and need:
        what = f"was trained on an unknown dataset {name!r}" if name else "does not record its training data"
        raise CheckpointError(
            f"checkpoint {str(path)!r} {what}, so the student's input size and normalisation are unknown: "
            f"pass {need} (image_size=, mean=, std=)"
        )
    size = image_size
    if size is None:
        recorded = data.get("image_size")
        size = recorded if isinstance(recorded, int) else spec.image_size if spec else None
        if size is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: the student's training image size is not recorded and "
                f"{name!r} has no native size: pass --image-size (image_size=)"
            )
    if mean is None or std is None:
        assert spec is not None
        if spec.mean is not None and spec.std is not None:
            m, s = spec.mean, spec.std
        else:  # statistics computed from the training images: load them as training did
            try:
                train = load_dataset(spec.name, data.get("root"), split="train", image_size=size)
            except (MimkdError, OSError) as e:
                raise DataError(
                    f"the student of {str(path)!r} was trained on {spec.name!r}, whose normalisation is "
                    f"computed from its training images, and they cannot be loaded ({str(e)[:300]}): pass "
                    "the student's normalisation with --mean/--std (mean=, std=)"
                ) from None
            m, s = train.mean, train.std
        mean = mean if mean is not None else m
        std = std if std is not None else s
    mean, std = _per_channel("mean", mean, in_channels), _per_channel("std", std, in_channels)
    return int(size), mean, std, name


def _per_channel(what: str, values: Any, channels: int) -> tuple[float, ...]:
    values = (values,) if isinstance(values, int | float) else tuple(values)
    out = tuple(float(v) for v in values)
    if len(out) == 1 and channels > 1:
        out = out * channels
    if len(out) != channels:
        raise DataError(f"the student takes {channels}-channel images but {what} has {len(out)} values")
    if what == "std" and any(not v > 0 for v in out):
        raise DataError(f"std must be positive, got {out}")
    return out


def classifier_input(model: nn.Module, sample: torch.Tensor) -> str:
    """The feature point ``"<path>:input"`` of the last ``nn.Linear`` that runs in a forward pass of
    ``sample`` (the pre-classifier features), or a ModelError when no ``nn.Linear`` runs."""
    ran: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: ran.append(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    probe_forward(model, sample, handles)
    if not ran:
        raise ModelError(
            f"{type(model).__name__} has no final nn.Linear (none runs in its forward pass): the linear "
            "probe reads the input of the student's classifier layer. Probe a network whose classifier is "
            "an nn.Linear"
        )
    return f"{ran[-1]}:input"


# -- the data ---------------------------------------------------------------------------------------------
def adapt_images(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 N×C×H×W images with ``channels`` channels: RGB→grey by luminance (:data:`LUMA`, rounded),
    grey→RGB by replication; unchanged when they already have ``channels``."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        w = torch.tensor(LUMA, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        grey = (images.to(torch.float32) * w).sum(1, keepdim=True)
        return grey.round_().clamp_(0, 255).to(torch.uint8)
    if have == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    raise DataError(
        f"cannot convert {have}-channel images for a {channels}-channel student (only RGB↔grey is supported)"
    )


def _load_probe_split(
    name: str,
    root: str | Path | None,
    split: str,
    size: int,
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> ImageDataset:
    # mean=0, std=1 lets loaders that compute statistics skip it; the student's statistics replace them.
    ds = load_dataset(name, root, split=split, image_size=size, mean=0.0, std=1.0)
    return replace(ds, images=adapt_images(ds.images, channels), mean=mean, std=std)


@torch.no_grad()  # not inference_mode: FeatureTap reads version counters, which inference tensors lack
def _extract(
    model: nn.Module, point: str, ds: ImageDataset, batch_size: int, device: torch.device
) -> torch.Tensor:
    tap = FeatureTap(model, [point])
    chunks = []
    try:
        for batch in eval_batches(ds, batch_size, device, with_labels=False):
            _, feats = tap.run(batch.images)
            f = feats[point]
            if f.dim() != 2:
                raise ModelError(
                    f"the input of the classifier {point.rsplit(':', 1)[0]!r} has shape {tuple(f.shape[1:])} "
                    "per image, not a vector: the linear probe needs N×D pre-classifier features"
                )
            chunks.append(f.float())
    finally:
        tap.remove()
    return torch.cat(chunks)


# -- the probe --------------------------------------------------------------------------------------------
def probe_milestones(epochs: int) -> list[int]:
    """Epochs after which the lr is multiplied by :data:`GAMMA`: 60 % and 80 % of ``epochs`` (floored;
    milestones outside ``[1, epochs - 1]`` are dropped)."""
    return sorted({m for m in (math.floor(f * epochs) for f in MILESTONE_FRACTIONS) if 1 <= m < epochs})


def _top1(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    with torch.inference_mode():
        correct = sum(
            int((head(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum()) for i in range(0, len(x), chunk)
        )
    return 100.0 * correct / len(x)


def linear_probe(
    checkpoint: str | Path,
    data: str,
    data_root: str | Path | None = None,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    train_fraction: float = 1.0,
    test_fraction: float = 1.0,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Linear-probe transfer of a frozen student: top-1 of a linear classifier trained on its
    pre-classifier features of ``data``'s train split, on ``data``'s test split.

    Args:
        checkpoint: a mimkd checkpoint file, or a run directory (its ``last.pt``; pass ``RUN/best.pt`` for the
            best epoch).
        data, data_root: the probe dataset (``mimkd datasets`` lists them) and its directory.
        epochs, lr, batch_size, weight_decay, seed: the linear classifier's SGD (momentum 0.9, lr ×0.1 at 60 %
            and 80 % of the epochs; see the module docstring).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        threads: CPU threads for torch (``torch.set_num_threads``; process-wide).
        train_fraction: a stratified subset (subset seed 0, fixed across probe seeds) of the probe's training
            split, for label-scarce transfer.
        test_fraction: a stratified subset of the test split — for smoke tests only; reports use 1.0.
        image_size, mean, std: override the student's training input size / normalisation (needed only for
            checkpoints that do not record their training data).

    Returns:
        ``{"dataset", "checkpoint", "arch", "feature_dim", "train_images", "test_images", "epochs", "lr",
        "train_top1", "test_top1", "seconds", ...}`` with accuracies in %.
    """
    t0 = time.perf_counter()
    for what, v in (("train_fraction", train_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < v <= 1.0:
            raise DataError(f"{what} must lie in (0, 1], got {v}")
    if epochs < 1 or batch_size < 1 or not lr > 0 or weight_decay < 0:
        raise MimkdError(
            f"need epochs >= 1, batch_size >= 1, lr > 0 and weight_decay >= 0; got epochs {epochs}, "
            f"batch_size {batch_size}, lr {lr}, weight_decay {weight_decay}"
        )
    spec = dataset_spec(data)  # an unknown name fails here, before any loading, listing the known ones
    from mimkd.engine.setup import resolve_device

    dev = resolve_device(str(device))
    if threads:
        torch.set_num_threads(threads)
    path = resolve_checkpoint_file(checkpoint)
    net, ck, arch = load_frozen_student(path)
    channels = int(ck["in_channels"])
    size, m, s, trained_on = student_input_spec(path, ck, channels, image_size=image_size, mean=mean, std=std)
    train = _load_probe_split(spec.name, data_root, "train", size, channels, m, s)
    test = _load_probe_split(spec.name, data_root, "test", size, channels, m, s)
    if train.classes != test.classes:
        raise DataError(f"{spec.name!r}: the train and test splits have different classes")
    if train_fraction < 1.0:
        train = train.subset(stratified_subset(train.labels, train_fraction, 0))
    if test_fraction < 1.0:
        test = test.subset(stratified_subset(test.labels, test_fraction, 0))
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{spec.name!r}: an empty split ({len(train)} train, {len(test)} test images)")

    net.to(dev)
    sample = next(eval_batches(train.subset(torch.arange(min(2, len(train)))), 2, dev)).images
    point = classifier_input(net, sample)
    t_feat = time.perf_counter()
    x_train = _extract(net, point, train, 256, dev)
    x_test = _extract(net, point, test, 256, dev)
    y_train, y_test = train.labels.to(dev), test.labels.to(dev)
    feature_seconds = time.perf_counter() - t_feat

    dim, classes = x_train.shape[1], train.num_classes
    head = nn.Linear(dim, classes).to(dev)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    milestones = probe_milestones(epochs)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=GAMMA)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(x_train)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise MimkdError(
                f"the linear probe diverged (loss {float(loss)} in epoch {epoch + 1}): lower the lr "
                f"(--lr, now {lr})"
            )
        sched.step()

    return {
        "dataset": spec.name,
        "data_root": str(data_root) if data_root is not None else None,
        "checkpoint": str(path),
        "arch": arch,
        "feature_dim": int(dim),
        "train_images": len(train),
        "test_images": len(test),
        "epochs": epochs,
        "lr": lr,
        "train_top1": _top1(head, x_train, y_train),
        "test_top1": _top1(head, x_test, y_test),
        "seconds": time.perf_counter() - t0,
        "feature_seconds": feature_seconds,
        "feature_point": point,
        "classes": classes,
        "image_size": size,
        "channels": channels,
        "mean": list(m),
        "std": list(s),
        "student_data": trained_on,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "momentum": MOMENTUM,
        "milestones": milestones,
        "gamma": GAMMA,
        "seed": seed,
        "train_fraction": train_fraction,
        "test_fraction": test_fraction,
    }


def write_probe_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON to ``path`` atomically (temp file + rename); returns the path."""
    from mimkd.engine.logging import write_json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json(p, result)
    return p


def default_output(checkpoint: str | Path, data: str) -> Path:
    """``probe_<data>.json`` in the run directory (the checkpoint's directory); a checkpoint file other than
    ``last.pt`` gets ``probe_<data>_<stem>.json`` so probes of ``best.pt`` and ``last.pt`` do not collide."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / f"probe_{data}.json"
    suffix = "" if p.stem == "last" else f"_{p.stem}"
    return p.parent / f"probe_{data}{suffix}.json"


# -- the command ------------------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_probe(a: argparse.Namespace) -> int:
    """``mimkd probe``: run :func:`linear_probe`, print one line, write the JSON result."""
    result = linear_probe(
        a.checkpoint,
        a.data,
        a.data_root,
        epochs=a.epochs,
        lr=a.lr,
        batch_size=a.batch_size,
        weight_decay=a.weight_decay,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        train_fraction=a.train_fraction,
        image_size=a.image_size,
        mean=a.mean,
        std=a.std,
    )
    out = write_probe_result(result, a.out or default_output(a.checkpoint, result["dataset"]))
    print(
        f"probe {result['arch']} on {result['dataset']}: test top-1 {result['test_top1']:.2f}  "
        f"train top-1 {result['train_top1']:.2f}  ({result['feature_dim']}-d features, "
        f"{result['train_images']}/{result['test_images']} images, {result['epochs']} epochs, "
        f"{result['seconds']:.1f} s) -> {out}"
    )
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``probe`` subcommand to ``subparsers`` (the ``add_subparsers()`` of the ``mimkd`` parser)."""
    p = subparsers.add_parser(
        "probe",
        help="linear-probe transfer: a linear classifier on a frozen student's features of another dataset",
        description="Freeze the student of a checkpoint, extract its pre-classifier features (the input of "
        "its final nn.Linear) for a dataset's train and test splits — resized to the student's input size, "
        "channels converted, normalised as the student was trained — and train a linear classifier on them "
        "(SGD momentum 0.9, lr x0.1 at 60% and 80% of the epochs). Prints the test top-1 and writes JSON.",
    )
    p.add_argument(
        "checkpoint", metavar="CKPT_OR_RUN_DIR", help="checkpoint file, or run directory (its last.pt)"
    )
    p.add_argument("--data", required=True, help="probe dataset (mimkd datasets lists them)")
    p.add_argument("--data-root", help="probe dataset directory (default: the dataset's standard location)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=1.0, help="stratified fraction of the train split")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument(
        "--image-size", type=int, help="student input size (default: recorded in the checkpoint's run)"
    )
    p.add_argument("--mean", type=_floats, help="student normalisation mean, e.g. 0.507,0.487,0.441")
    p.add_argument("--std", type=_floats, help="student normalisation std (default: its training dataset's)")
    p.add_argument("--out", help="result JSON (default: probe_<data>.json in the checkpoint's run directory)")
    p.set_defaults(fn=cmd_probe)
    return p
