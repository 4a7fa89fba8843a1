"""Export the deployable student of a run: ``mimkd export RUN_DIR --format onnx|safetensors|torchscript``.

Only a checkpoint's ``"model"`` entry (the student's ``state_dict``) is used: critics, auxiliary heads, memory
banks and optimiser state stay behind by construction. The architecture recorded in the checkpoint is built,
the weights are loaded strictly, the network is put in eval mode and written in the chosen format. Every
export ends with a check: the artefact is loaded back independently (a fresh model from the safetensors file,
``torch.jit.load``, an ``onnxruntime`` session) and its outputs on a real batch of the run's test data are
compared with the PyTorch student's; a mismatch is an :class:`ExportError`.

Formats:

* ``safetensors``: the state dict, with ``arch``/``num_classes``/``in_channels`` as string metadata;

Every format carries the same metadata (safetensors header, ONNX ``metadata_props``, a TorchScript extra
file ``mimkd.json``), including the student's input ``input_shape``, ``mean`` and ``std`` (JSON lists; the
network expects ``(pixels / 255 - mean) / std`` per channel) when the checkpoint records them (checkpoints
written since the trainer recorded them).
* ``torchscript``: ``torch.jit.trace`` on the real batch (``torch.jit.script`` when tracing fails);
* ``onnx``: the TorchScript-based exporter (``dynamo=False``) with a dynamic batch axis, falling back to the
  ``torch.export``-based one (needs ``onnxscript``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimkd.errors import CheckpointError, MimkdError

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "resolve_checkpoint",
    "load_student",
    "sample_batch",
    "export_student",
    "export_run",
    "input_spec",
]

#: Supported formats and the file suffix each gets by default.
FORMATS: dict[str, str] = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".torchscript.pt"}
#: Tolerances of the final check (the exported artefact against the PyTorch student).
ATOL, RTOL = 1e-4, 1e-3
PIP_HINTS = {
    "safetensors": "pip install safetensors",
    "onnx": "pip install onnx onnxruntime",
    "onnxruntime": "pip install onnxruntime",
    "onnxscript": "pip install onnxscript",
}


class ExportError(MimkdError):
    """An export failed or its artefact does not reproduce the student's outputs."""


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and how well the artefact matches the student."""

    checkpoint: Path
    out: Path
    fmt: str
    arch: str
    num_classes: int
    in_channels: int
    parameters: int
    batch_source: str
    max_abs_diff: float | None
    checked_with: str | None
    notes: list[str] = field(default_factory=list)
    input: dict[str, Any] | None = None  # shape, mean, std the student expects (None: not recorded)


def _first_line(e: BaseException) -> str:
    """An exception's first message line (at most 200 characters), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _require(module: str, pip_name: str | None = None) -> Any:
    """Import an optional package or raise a one-line ExportError naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        hint = PIP_HINTS.get(pip_name or module, f"pip install {pip_name or module}")
        raise ExportError(f"this export needs the {module!r} package: {hint}") from None


def resolve_checkpoint(path: str | Path, which: str | None = None, network: str | None = None) -> Path:
    """The checkpoint file to export: ``path`` itself when it is a file; in a run directory ``best.pt``
    (falling back to ``last.pt``), ``last.pt`` with ``which="last"``, or ``best_<network>.pt`` for another
    network of a cohort (DML, DCM)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist: pass a run directory or a checkpoint file")
    if p.is_file():
        if network is not None or which is not None:
            raise CheckpointError(
                f"{str(p)!r} is a checkpoint file: --which and --network only apply to a run directory"
            )
        return p
    if network is not None and network != "net1":
        if which == "last":
            raise CheckpointError(
                f"run {str(p)!r} keeps only best_{network}.pt for network {network!r}: drop --which last"
            )
        f = p / f"best_{network}.pt"
        if not f.is_file():
            others = sorted(q.stem[len("best_") :] for q in p.glob("best_*.pt"))
            raise CheckpointError(
                f"run {str(p)!r} has no best_{network}.pt; "
                + (f"its other networks: {', '.join(others)}" if others else "it has no other networks")
            )
        return f
    order = ["last.pt"] if which == "last" else ["best.pt", "last.pt"]
    for name in order:
        if (p / name).is_file():
            return p / name
    raise CheckpointError(
        f"{str(p)!r} has no {' or '.join(order)}: not a mimkd run directory, or the run has not finished an "
        "epoch yet"
    )


def load_student(ckpt_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture recorded in the checkpoint, load its ``model`` weights strictly, eval mode."""
    from mimkd.checkpoint import load_checkpoint, load_weights
    from mimkd.models import build_network

    ck = load_checkpoint(ckpt_path)
    arch = ck.get("arch")
    if not isinstance(arch, str) or not arch or arch == "?":
        raise CheckpointError(
            f"checkpoint {str(ckpt_path)!r} does not record its architecture ('arch'): only mimkd run "
            "checkpoints can be exported"
        )
    nc, ch = ck.get("num_classes"), ck.get("in_channels")
    if not isinstance(nc, int) or not isinstance(ch, int):
        raise CheckpointError(
            f"checkpoint {str(ckpt_path)!r} does not record num_classes/in_channels: cannot rebuild {arch!r}"
        )
    net = build_network(arch, nc, ch)
    load_weights(net, ckpt_path, arch)
    return net.eval(), ck


def _run_config(ckpt_path: Path, ck: dict[str, Any]) -> dict[str, Any]:
    """The run's configuration: ``config.yaml`` beside the checkpoint, else the copy in the checkpoint."""
    cfg_file = ckpt_path.parent / "config.yaml"
    if cfg_file.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(cfg_file.read_text())
            if isinstance(cfg, dict):
                return cfg
        except (OSError, yaml.YAMLError):
            pass
    cfg = ck.get("config")
    return cfg if isinstance(cfg, dict) else {}


def sample_batch(
    ckpt_path: str | Path, ck: dict[str, Any], in_channels: int, n: int = 16
) -> tuple[torch.Tensor, str, str | None]:
    """Up to ``n`` test images of the run's dataset, normalised as in training (``eval_batches``).

    Returns ``(batch, description, warning)``; when the data cannot be loaded the batch is random, with the
    reason in ``warning``.
    """
    from mimkd.data import dataset_spec, eval_batches, load_dataset

    data = _run_config(Path(ckpt_path), ck).get("data") or {}
    name, root, size = data.get("name"), data.get("root"), data.get("image_size")
    reason = "the run records no dataset"
    if isinstance(name, str):
        try:
            test = load_dataset(name, root, split="test", image_size=size)
            test = test.subset(torch.arange(min(n, len(test))))
            x = next(eval_batches(test, n, with_labels=False)).images.float()
            if x.shape[1] == in_channels:
                return x, f"{len(x)} test images of {name}", None
            reason = f"{name} has {x.shape[1]} channels, the network takes {in_channels}"
        except (MimkdError, OSError, StopIteration) as e:
            reason = f"cannot load {name!r}: {_first_line(e)}"
        if size is None:
            try:
                size = dataset_spec(name).image_size
            except MimkdError:
                size = None
    size = size or 32
    x = torch.randn(n, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    return x, f"{n} random {in_channels}x{size}x{size} inputs", f"{reason}: checking on a random batch"


def _check_out(out: Path) -> None:
    """Create the output's directory and make sure a file can be written there."""
    if out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a directory: pass a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(
            f"--out {str(out)!r}: cannot create directory {str(out.parent)!r} ({e.strerror or e})"
        ) from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ExportError(f"--out {str(out)!r} is not writable")


def _compare(reference: torch.Tensor, got: Any, what: str) -> float:
    """Max abs difference; an ExportError when beyond ``ATOL``/``RTOL`` or the shapes differ."""
    got_t = torch.as_tensor(got).float()
    if tuple(got_t.shape) != tuple(reference.shape):
        raise ExportError(
            f"{what} returns shape {tuple(got_t.shape)}, the student {tuple(reference.shape)}: the export "
            "is broken"
        )
    diff = float((got_t - reference).abs().max()) if reference.numel() else 0.0
    if not torch.allclose(got_t, reference, atol=ATOL, rtol=RTOL):
        raise ExportError(
            f"{what} does not reproduce the student: max abs difference {diff:.3g} "
            f"(tolerance {ATOL:g} abs + {RTOL:g} rel)"
        )
    return diff


def _export_safetensors(net: nn.Module, meta: dict[str, str], out: Path, x: torch.Tensor, ref: torch.Tensor):
    _require("safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mimkd.models import build_network

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(sd, str(out), metadata=meta)
    with safe_open(str(out), framework="pt") as f:
        m = f.metadata() or {}
    fresh = build_network(m["arch"], int(m["num_classes"]), int(m["in_channels"]))
    fresh.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        got = fresh.eval()(x)
    return _compare(ref, got, "the safetensors weights in a fresh model"), "a fresh model", []


def _export_torchscript(net: nn.Module, meta: dict[str, str], out: Path, x: torch.Tensor, ref: torch.Tensor):
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                scripted = torch.jit.trace(net, x)
        except Exception as e:  # any tracing failure: try scripting
            notes.append(f"torch.jit.trace failed ({type(e).__name__}); used torch.jit.script")
            try:
                scripted = torch.jit.script(net)
            except Exception as e2:
                raise ExportError(
                    f"cannot convert {meta['arch']!r} to TorchScript: trace failed "
                    f"({_first_line(e)}), script failed ({_first_line(e2)})"
                ) from None
        torch.jit.save(scripted, str(out), _extra_files={"mimkd.json": _json(meta)})
        loaded = torch.jit.load(str(out), map_location="cpu")
    with torch.no_grad():
        got = loaded.eval()(x)
    return _compare(ref, got, "the TorchScript module"), "torch.jit.load", notes


def _json(meta: dict[str, str]) -> str:
    import json

    return json.dumps(meta, sort_keys=True)


def _export_onnx(net: nn.Module, meta: dict[str, str], out: Path, x: torch.Tensor, ref: torch.Tensor):
    onnx = _require("onnx")
    notes: list[str] = []
    names = {"input_names": ["input"], "output_names": ["logits"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (x,),
                str(out),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **names,
            )
        notes.append("exporter: TorchScript-based (dynamo=False)")
    except Exception as e:  # legacy exporter gone or failing
        first = _first_line(e)
        _require("onnxscript")
        try:
            batch = torch.export.Dim("batch", min=1)
            prog = torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=({0: batch},), **names)
            prog.save(str(out))
        except Exception as e2:
            raise ExportError(
                f"cannot export {meta['arch']!r} to ONNX: TorchScript-based exporter: {first}; "
                f"torch.export-based: {_first_line(e2)}"
            ) from None
        notes.append(f"exporter: torch.export-based (dynamo=True); the TorchScript-based one failed: {first}")
    model = onnx.load(str(out))
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append("onnxruntime is not installed: outputs not checked (pip install onnxruntime)")
        return None, None, notes
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return _compare(ref, got, "the ONNX model in onnxruntime"), "onnxruntime", notes


_EXPORTERS = {"onnx": _export_onnx, "safetensors": _export_safetensors, "torchscript": _export_torchscript}


def export_student(
    net: nn.Module, fmt: str, out: str | Path, x: torch.Tensor, meta: dict[str, str]
) -> tuple[float | None, str | None, list[str]]:
    """Write ``net`` (eval mode) as ``fmt`` to ``out`` and check the artefact on ``x``.

    Returns ``(max_abs_diff, checked_with, notes)``; ``max_abs_diff`` is ``None`` when the check could not
    run (ONNX without onnxruntime).
    """
    if fmt not in _EXPORTERS:
        raise ExportError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out)
    net = net.eval()
    with torch.no_grad():
        ref = net(x).float()
    if not isinstance(ref, torch.Tensor):
        raise ExportError(f"{meta.get('arch')!r} does not return a tensor of logits: cannot export it")
    try:
        return _EXPORTERS[fmt](net, meta, out, x, ref)
    except PermissionError as e:
        raise ExportError(f"cannot write {str(out)!r}: {e.strerror or e}") from None


def export_run(
    path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    which: str | None = None,
    network: str | None = None,
    batch_size: int = 16,
) -> ExportResult:
    """Export the student (or ``network``) of a run directory or checkpoint file; see the module docstring.

    The default output is ``<run dir>/export/<checkpoint stem><suffix>`` (e.g. ``export/best.onnx``).
    """
    from mimkd.evaluation.flops import count_parameters

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    ckpt = resolve_checkpoint(path, which, network)
    net, ck = load_student(ckpt)
    arch, nc, ch = ck["arch"], ck["num_classes"], ck["in_channels"]
    out_path = Path(out) if out is not None else ckpt.parent / "export" / f"{ckpt.stem}{FORMATS[fmt]}"
    x, source, warning = sample_batch(ckpt, ck, ch, batch_size)
    notes = [f"WARNING: {warning}"] if warning else []
    meta = {
        "format": "mimkd-student",
        "arch": arch,
        "num_classes": str(nc),
        "in_channels": str(ch),
        "network": str(ck.get("network") or network or "net1"),
        "source": str(ckpt),
    }
    spec = input_spec(ck)
    if spec is not None:
        meta.update({"input_shape": json.dumps(spec["shape"]), "mean": json.dumps(spec["mean"])})
        meta["std"] = json.dumps(spec["std"])
    if warning:
        print(f"mimkd: warning: {warning}", file=sys.stderr)
    diff, checked_with, more = export_student(net, fmt, out_path, x, meta)
    return ExportResult(
        checkpoint=ckpt,
        out=out_path,
        fmt=fmt,
        arch=arch,
        num_classes=nc,
        in_channels=ch,
        parameters=count_parameters(net),
        batch_source=source,
        max_abs_diff=diff,
        checked_with=checked_with,
        notes=notes + more,
        input=spec,
    )


def input_spec(ck: dict[str, Any]) -> dict[str, Any] | None:
    """The student's recorded input (``shape``, ``mean``, ``std``), or None for a checkpoint without it."""
    spec = ck.get("input")
    if not isinstance(spec, dict) or not all(k in spec for k in ("shape", "mean", "std")):
        return None
    return {k: [float(v) if k != "shape" else int(v) for v in spec[k]] for k in ("shape", "mean", "std")}
