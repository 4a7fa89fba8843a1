"""``mimkd export RUN --format hf``: a folder a Hugging Face Hub model repository can hold (docs/teachers.md).

The folder holds ``model.safetensors`` (the student's state dict), ``config.json`` (architecture, classes,
class names when the run's dataset has them, the input: channels, height, width and the mean/std the run
normalised with) and a model card ``README.md`` (method, teacher, dataset, accuracy from the run's
``summary.json``). It is written beside its final name and renamed into place, then loaded back into a fresh
network whose logits must equal the student's. ``--teacher FOLDER`` and ``--teacher hf:ORG/REPO`` load it
(:mod:`mimkd.teachers.hf`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimkd.errors import MimkdError

from .export import (
    ExportError,
    ExportResult,
    _compare,
    _require,
    _run_config,
    input_spec,
    load_student,
    resolve_checkpoint,
    sample_batch,
)

__all__ = ["HF_FORMAT", "export_run_hf", "write_hf_folder", "read_hf_folder", "load_hf_model", "model_card"]

HF_FORMAT = "mimkd-hf"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


def _test_data(ckpt: Path, ck: dict[str, Any], in_channels: int, n: int):
    """``(batch, description, warning, class names)``: up to ``n`` test images of the run's dataset (random
    ones when it cannot be loaded) and its class names (None then)."""
    from mimkd.data import eval_batches, load_dataset

    data = _run_config(ckpt, ck).get("data") or {}
    with contextlib.suppress(MimkdError, OSError, StopIteration, KeyError, TypeError):
        test = load_dataset(data["name"], data.get("root"), split="test", image_size=data.get("image_size"))
        x = next(eval_batches(test.subset(torch.arange(min(n, len(test)))), n, with_labels=False))
        x = x.images.float()
        if x.shape[1] == in_channels:
            return x, f"{len(x)} test images of {data['name']}", None, list(test.classes)
    x, source, warning = sample_batch(ckpt, ck, in_channels, n)
    return x, source, warning, None


def _summary(ckpt: Path) -> dict[str, Any]:
    try:
        s = json.loads((ckpt.parent / "summary.json").read_text())
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def _hf_config(ck: dict[str, Any], summary: dict[str, Any], classes: list[str] | None, which: str):
    """config.json: the network, its input and what the run reports for the exported checkpoint."""
    spec = input_spec(ck)
    nc, ch = ck["num_classes"], ck["in_channels"]
    shape = spec["shape"] if spec else summary.get("student_input_shape")
    inp: dict[str, Any] = {"channels": ch, "height": None, "width": None, "mean": None, "std": None}
    if shape:
        inp.update(channels=shape[0], height=shape[1], width=shape[2])
    if spec:
        inp.update(mean=spec["mean"], std=spec["std"], normalisation="x = (pixels / 255 - mean) / std")
    net = ck.get("network")
    if isinstance(net, str) and net != "net1":  # another network of a cohort: its own records
        summary = {**summary, **((summary.get("networks") or {}).get(net) or {})}
    record = summary.get(which) if isinstance(summary.get(which), dict) else {}
    return {
        "format": HF_FORMAT,
        "format_version": 1,
        "library_name": "mimkd",
        "architecture": ck["arch"],
        "num_classes": nc,
        "in_channels": ch,
        "class_names": classes if classes and len(classes) == nc else None,
        "input": inp,
        "method": summary.get("method") or ck.get("method"),
        "teacher": summary.get("teacher"),
        "teacher_test_top1": summary.get("teacher_test_top1"),
        "dataset": summary.get("data") or (spec or {}).get("data"),
        "checkpoint": which,
        "test_top1": record.get("top1"),
        "test_top5": record.get("top5"),
        "epoch": record.get("epoch"),
    }


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "unknown"


def model_card(config: dict[str, Any], summary: dict[str, Any], parameters: int) -> str:
    """The README.md of the folder: Hub metadata (YAML front matter) and what the run reports."""
    c, inp = config, config["input"]
    tags = ["image-classification", "knowledge-distillation", "mimkd"] + (
        [c["method"]] if c["method"] else []
    )
    front = ["---", "library_name: mimkd", "pipeline_tag: image-classification", "tags:"]
    front += [f"- {t}" for t in tags]
    if c["dataset"]:
        front += ["datasets:", f"- {c['dataset']}"]
    front += ["metrics:", "- accuracy", "---", ""]
    teacher = c["teacher"] or "none"
    if c["teacher_test_top1"] is not None:
        teacher += f" (test top-1 {_fmt(c['teacher_test_top1'])} %)"
    size = (
        f"{inp['channels']}×{inp['height']}×{inp['width']}"
        if inp["height"]
        else f"{inp['channels']} channels"
    )
    norm = f", mean {inp['mean']}, std {inp['std']}: x = (pixels / 255 - mean) / std" if inp["mean"] else ""
    epoch = f" (epoch {c['epoch'] + 1})" if isinstance(c["epoch"], int) else ""
    body = [
        f"# {c['architecture']} — {c['method'] or 'trained'} on {c['dataset'] or 'an unrecorded dataset'}",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{c['architecture']}` (mimkd model zoo), {parameters:,} parameters |",
        f"| method | {c['method'] or 'unknown'} |",
        f"| teacher | {teacher} |",
        f"| dataset | {c['dataset'] or 'unknown'} ({c['num_classes']} classes, "
        f"{summary.get('train_images', 'unknown')} training images) |",
        f"| test top-1 | {_fmt(c['test_top1'])} %{epoch}, {c['checkpoint']} checkpoint; "
        f"top-5 {_fmt(c['test_top5'])} |",
        f"| input | {size}{norm} |",
        "",
        "Exported by `mimkd export RUN --format hf`: `model.safetensors` holds the network's state dict,",
        "`config.json` the architecture, classes and input. Use it as a teacher with",
        "`mimkd distill --teacher hf:ORG/REPO ...` (needs `pip install 'mimkd[hub]'`), or in Python:",
        "",
        "```python",
        "from mimkd.evaluation.export_hf import load_hf_model",
        'net, config = load_hf_model("path/to/this/folder")',
        "```",
        "",
        "See docs/teachers.md of mimkd.",
        "",
    ]
    return "\n".join(front + body)


def write_hf_folder(net: nn.Module, config: dict[str, Any], card: str, out: Path) -> None:
    """Write the three files into a temporary folder beside ``out``, then put it in place of ``out`` (which
    may only be a previous export of this format or an empty folder)."""
    _require("safetensors")
    from safetensors.torch import save_file

    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_hf_export(out))):
        raise ExportError(
            f"--out {str(out)!r} exists and is not an earlier `--format hf` export: choose another"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write under {str(out.parent)!r}: {e.strerror or e}") from None
    try:
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        meta = {"format": "pt", "mimkd_format": HF_FORMAT, "arch": config["architecture"]}
        save_file(sd, str(tmp / WEIGHTS), metadata=meta)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(card)
        if out.exists():
            aside = out.with_name(f".{out.name}.old")
            shutil.rmtree(aside, ignore_errors=True)
            out.rename(aside)
            tmp.rename(out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_hf_export(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG).read_text()).get("format") == HF_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_hf_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` of a folder written by :func:`write_hf_folder` (docs/teachers.md)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise ExportError(f"{str(folder)!r} is not a mimkd Hub folder: it needs {WEIGHTS} and {CONFIG}")
    try:
        config = json.loads((folder / CONFIG).read_text())
        arch, nc, ch = config["architecture"], int(config["num_classes"]), int(config["in_channels"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(
            f"{str(folder / CONFIG)!r}: unreadable or incomplete ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(arch, str) or nc < 1 or ch < 1:
        raise ExportError(f"{str(folder / CONFIG)!r}: bad architecture/num_classes/in_channels")
    _require("safetensors")
    from safetensors.torch import load_file

    try:
        sd = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
        raise ExportError(f"{str(folder / WEIGHTS)!r}: not a readable safetensors file ({e})") from None
    return sd, config


def load_hf_model(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh network built from the folder's ``config.json`` with its weights (strict), in eval mode."""
    from mimkd.models import build_network

    sd, config = read_hf_folder(folder)
    net = build_network(config["architecture"], int(config["num_classes"]), int(config["in_channels"]))
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ExportError(
            f"{str(folder)!r}: the weights do not fit {config['architecture']!r} ({first})"
        ) from None
    return net.eval(), config


def export_run_hf(
    path: str | Path,
    out: str | Path | None = None,
    which: str | None = None,
    network: str | None = None,
    batch_size: int = 16,
) -> ExportResult:
    """Export a run's student as a Hub folder (default ``RUN/export/<checkpoint stem>-hf``), then load it
    back and require equal logits on a real batch (docs/teachers.md)."""
    from mimkd.evaluation.flops import count_parameters

    ckpt = resolve_checkpoint(path, which, network)
    net, ck = load_student(ckpt)
    out_dir = Path(out) if out is not None else ckpt.parent / "export" / f"{ckpt.stem}-hf"
    x, source, warning, classes = _test_data(ckpt, ck, ck["in_channels"], batch_size)
    summary = _summary(ckpt) if ckpt.stem.startswith(("best", "last")) else {}
    if network and network != "net1":
        ck = {**ck, "network": network}
    config = _hf_config(ck, summary, classes, "last" if ckpt.stem == "last" else "best")
    params = count_parameters(net)
    write_hf_folder(net, config, model_card(config, summary, params), out_dir)
    with torch.no_grad():
        ref = net(x).float()
        fresh, _ = load_hf_model(out_dir)
        diff = _compare(ref, fresh(x).float(), "the Hub folder loaded into a fresh model")
    notes = [f"WARNING: {warning}"] if warning else []
    notes.append(f"files: {WEIGHTS}, {CONFIG}, {CARD} (upload: `hf upload ORG/REPO {out_dir}`)")
    if config["class_names"] is None:
        notes.append("class names: not known for this run (config.json has null)")
    return ExportResult(
        checkpoint=ckpt,
        out=out_dir,
        fmt="hf",
        arch=ck["arch"],
        num_classes=ck["num_classes"],
        in_channels=ck["in_channels"],
        parameters=params,
        batch_source=source,
        max_abs_diff=diff,
        checked_with="a fresh model",
        notes=notes,
        input=input_spec(ck),
    )
