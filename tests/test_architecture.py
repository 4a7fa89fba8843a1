"""The package's layering, checked on the source with ``scripts/arch_report.py`` (``ast``, nothing imported).

Layers, bottom to top: ``mimkd.errors`` and ``mimkd.checkpoint`` (checkpoint I/O); the library
(``mimkd.data``, ``models``, ``mi``, ``features``, ``distillers``, ``engine``, ``evaluation``); then
``mimkd.bench`` and ``mimkd.experiments``, which use the engine; ``mimkd.cli`` on top, the only place that
parses command lines.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _load_arch_report():
    spec = importlib.util.spec_from_file_location("arch_report", ROOT / "scripts" / "arch_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("arch_report", mod)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


arch = _load_arch_report()

#: Library layers that must never reach the command line, the benchmark or the studies.
LOWER = (
    "mimkd.engine",
    "mimkd.distillers",
    "mimkd.data",
    "mimkd.models",
    "mimkd.mi",
    "mimkd.features",
    "mimkd.checkpoint",
)
UPPER = ("mimkd.cli", "mimkd.bench", "mimkd.experiments")
#: Packages and modules made by the CLI / bench / checkpoint split.
OWNED = ("mimkd.cli", "mimkd.bench", "mimkd.checkpoint")


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def analysis():
    return arch.analyse(SRC)


@pytest.fixture(scope="module")
def graph(analysis):
    g: dict[str, set[str]] = {}
    for e in analysis.edges:
        g.setdefault(e.src, set()).add(e.dst)
    return g


def _path_to(graph: dict[str, set[str]], start: str, targets: tuple[str, ...]) -> list[str] | None:
    """A shortest import chain from ``start`` to a module in ``targets`` (breadth first), or None."""
    prev: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        if v != start and _in(v, targets):
            chain = [v]
            while prev[chain[-1]] is not None:
                chain.append(prev[chain[-1]])
            return chain[::-1]
        for w in sorted(graph.get(v, ())):
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return None


def test_argparse_only_in_the_cli_package(analysis):
    outside = [f for f in analysis.argparse_files if not f.startswith("mimkd/cli/")]
    assert not outside, f"argparse imported outside mimkd/cli: {outside}"
    assert "mimkd/cli/__init__.py" in analysis.argparse_files  # the analysis does see argparse


def test_lower_layers_never_reach_cli_bench_or_experiments(analysis, graph):
    """Not directly, and not through other modules (any import counts: module, function, TYPE_CHECKING)."""
    bad = {}
    for m in analysis.modules:
        if _in(m, LOWER) and (chain := _path_to(graph, m, UPPER)):
            bad[m] = " -> ".join(chain)
    assert not bad, "\n".join(f"{m}: {chain}" for m, chain in bad.items())


def test_no_cycle_involves_the_trainer(analysis):
    cycles = [c for c in analysis.cycles if "mimkd.engine.trainer" in c]
    assert not cycles, cycles


def test_the_split_modules_are_in_no_cycle(analysis):
    owned = [m for m in analysis.modules if _in(m, OWNED)]
    assert {"mimkd.cli", "mimkd.cli.bench", "mimkd.bench.timing", "mimkd.checkpoint"} <= set(owned)
    cycles = [c for c in analysis.cycles if any(_in(m, OWNED) for m in c)]
    assert not cycles, cycles


def test_old_module_paths_are_gone(analysis):
    """Moved, not shimmed: the old modules do not exist any more."""
    old = {
        "mimkd.engine.checkpoint",
        "mimkd.probe_command",
        "mimkd.experiments.cli",
        "mimkd.evaluation.bench",
        "mimkd.evaluation.bench_build",
        "mimkd.evaluation.bench_report",
    }
    assert not old & set(analysis.modules)
    assert not (SRC / "mimkd" / "cli.py").exists()  # the package mimkd/cli/ replaces it


def test_checkpoint_io_is_at_the_bottom(graph):
    assert graph.get("mimkd.checkpoint", set()) <= {"mimkd.errors"}
    for m in ("mimkd.distillers.kdep_align", "mimkd.evaluation.probe"):
        assert not any(_in(d, ("mimkd.engine",)) for d in graph.get(m, ())), (m, graph.get(m))


def test_the_engine_never_imports_the_benchmark(graph):
    assert not [(s, d) for s, ds in graph.items() for d in ds if _in(s, ("mimkd.engine",)) and _in(d, UPPER)]


# -- the analysis itself, on a made-up package -------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "mimkd" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_analysis_resolves_imports_and_finds_cycles(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    src = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "from .b import f\n",
            "a/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mimkd.c import C\n",
            "c.py": f"import argparse\n\n\ndef g():\n    from mimkd.a import b\n{body}\n",
            "d.py": "import mimkd.a.b\nfrom mimkd import e\n",
            "e.py": "from . import d\n",
            "engine/x.py": "from ..c import g\n",  # a namespace package (no __init__.py)
        },
    )
    a = arch.analyse(src)
    edges = {(e.src, e.dst, e.kind) for e in a.edges}
    assert ("mimkd.a", "mimkd.a.b", "module") in edges
    assert ("mimkd.a.b", "mimkd.c", "type_checking") in edges
    assert ("mimkd.c", "mimkd.a.b", "function") in edges  # `from mimkd.a import b`: the submodule
    assert ("mimkd.d", "mimkd.a.b", "module") in edges and ("mimkd.d", "mimkd.e", "module") in edges
    assert ("mimkd.engine.x", "mimkd.c", "module") in edges
    assert a.cycles == [["mimkd.a.b", "mimkd.c"], ["mimkd.d", "mimkd.e"]]
    assert a.argparse_files == ["mimkd/c.py"]
    assert [(f["name"], f["lines"]) for f in a.long_functions] == [("g", 63)]
    assert len(a.function_level_imports) == 1
    assert "Cycle 1: 2 modules" in arch.format_markdown(a) and a.to_json()["summary"]["cycles"] == 2
