"""Linear-probe transfer, the feature side: the frozen student, its input adaptation, its features.

:func:`mimkd.engine.linear_probe.linear_probe` (``mimkd probe``, the protocol of the MIMKD paper's Table 3)
trains a linear classifier on what this module extracts. How the probe dataset is adapted to the student
(our choice, after CRD's protocol):

* **size**: images are resized to the student's training image size — the run's ``data.image_size``, else
  the native size of the dataset it was trained on (32 for CIFAR students, so STL-10 96→32 and TinyImageNet
  64→32) — with :func:`mimkd.data.dataset.resize_images` (bilinear, antialiased when shrinking);
* **channels**: RGB→grey by ITU-R 601 luminance ``0.299 R + 0.587 G + 0.114 B`` (what PIL's ``"L"`` mode
  does) for a 1-channel student, grey→RGB by replication for a 3-channel one;
* **normalisation**: the STUDENT's training normalisation (CIFAR-100 statistics for a CIFAR-100 student),
  not the probe dataset's own; for datasets whose statistics are computed from the training images (digits,
  folder trees) the student's training split is loaded to compute them, as training did;
* no augmentation; the full test split.

The features are the input of the student's final ``nn.Linear``, the one that runs last in a forward pass
(``feat[-1]`` in RepDistiller's terms, 128-d for WRN-16-2), extracted once per split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimkd.data import ImageDataset, dataset_spec, eval_batches, load_dataset
from mimkd.errors import CheckpointError, DataError, MimkdError, ModelError
from mimkd.features import FeatureTap, probe_forward

__all__ = [
    "LUMA",
    "resolve_checkpoint_file",
    "load_frozen_student",
    "student_input_spec",
    "classifier_input",
    "adapt_images",
    "default_output",
    "extract_features",
    "load_probe_split",
]

#: ITU-R 601 luminance weights for RGB→grey.
LUMA = (0.299, 0.587, 0.114)


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
    from mimkd.checkpoint import extract_state_dict, load_checkpoint, load_weights
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


def load_probe_split(
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
def extract_features(
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


def default_output(checkpoint: str | Path, data: str) -> Path:
    """``probe_<data>.json`` in the run directory (the checkpoint's directory); a checkpoint file other than
    ``last.pt`` gets ``probe_<data>_<stem>.json`` so probes of ``best.pt`` and ``last.pt`` do not collide."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / f"probe_{data}.json"
    suffix = "" if p.stem == "last" else f"_{p.stem}"
    return p.parent / f"probe_{data}{suffix}.json"
