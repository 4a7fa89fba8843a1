"""Architecture report of the ``mimkd`` package: long functions, import cycles, function-level imports and
argparse users, from the source alone (``ast``; nothing is imported).

    python scripts/arch_report.py [SRC] [--json] [--max-lines 60]

``SRC`` is the directory that holds the ``mimkd`` package (default: this checkout's ``src``), or the package
directory itself. The output is markdown, or JSON with ``--json``.

What counts:

* **long functions**: every ``def``/``async def`` (methods and nested functions included, each on its own)
  whose span — from its ``def`` line to its last line, docstring included, decorators excluded — is longer
  than ``--max-lines``.
* **import graph**: an edge ``A -> B`` for every ``import``/``from ... import`` in module ``A`` that names
  module ``B`` of the package, wherever it sits: at module level, inside a function, or under
  ``if TYPE_CHECKING:``. Relative imports are resolved. ``import mimkd.x.y`` and ``from mimkd.x.y import z``
  are edges to ``mimkd.x.y`` (or to ``mimkd.x.y.z`` when ``z`` is a submodule); ``from mimkd.x import y``
  is an edge to ``mimkd.x.y`` when ``y`` is a submodule, else to the package ``mimkd.x``. The parent
  packages that Python initialises on the way are not counted as edges (each would make every package whose
  ``__init__`` imports its own modules a cycle).
* **cycles**: the strongly connected components of that graph with more than one module, each with the
  edges inside it (``file:line``, and where the import sits).
* **function-level imports**: import statements inside a function body that name a module of the package.
  Imports by name at run time (``importlib.import_module``) are not seen, neither as edges nor here.
* **argparse**: files that import ``argparse`` anywhere.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = "mimkd"
DEFAULT_MAX_LINES = 60

__all__ = ["Edge", "Analysis", "analyse", "find_package", "strongly_connected", "format_markdown", "main"]


@dataclass(frozen=True)
class Edge:
    """One import of a package module by another."""

    src: str
    dst: str
    file: str
    line: int
    kind: str  # "module", "function" or "type_checking"


@dataclass
class Analysis:
    root: str
    modules: list[str]
    long_functions: list[dict[str, Any]]
    edges: list[Edge]
    cycles: list[list[str]]
    function_level_imports: list[dict[str, Any]]
    argparse_files: list[str]
    max_lines: int = DEFAULT_MAX_LINES
    files: dict[str, str] = field(default_factory=dict)  # module -> file (relative to root)

    def cycle_edges(self, cycle: list[str]) -> list[Edge]:
        members = set(cycle)
        return [e for e in self.edges if e.src in members and e.dst in members]

    def summary(self) -> dict[str, int]:
        return {
            "modules": len(self.modules),
            "functions_over_max_lines": len(self.long_functions),
            "cycles": len(self.cycles),
            "modules_in_cycles": sum(len(c) for c in self.cycles),
            "function_level_imports": len(self.function_level_imports),
            "argparse_files": len(self.argparse_files),
            "argparse_files_outside_cli": sum(
                not f.startswith(f"{PACKAGE}/cli/") for f in self.argparse_files
            ),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "max_lines": self.max_lines,
            "summary": self.summary(),
            "long_functions": self.long_functions,
            "cycles": [
                {"modules": c, "edges": [asdict(e) for e in self.cycle_edges(c)]} for c in self.cycles
            ],
            "function_level_imports": self.function_level_imports,
            "argparse_files": self.argparse_files,
            "edges": [asdict(e) for e in self.edges],
        }


# -- modules and import resolution -----------------------------------------------------------------------
def find_package(src: str | Path) -> Path:
    """The ``mimkd`` package directory under ``src`` (or ``src`` itself when it is that directory)."""
    src = Path(src).resolve()
    for cand in (src / PACKAGE, src / "src" / PACKAGE, src):
        if cand.name == PACKAGE and cand.is_dir() and any(cand.glob("*.py")):
            return cand
    raise SystemExit(f"arch_report: no {PACKAGE} package in {src}")


def _module_names(pkg: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``__init__`` names its package;
    a directory without ``__init__.py`` is a namespace package and has no module of its own)."""
    out: dict[str, Path] = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _packages(modules: dict[str, Path], pkg: Path) -> set[str]:
    """Dotted names of the package's packages, namespace packages included."""
    return {".".join(d.relative_to(pkg.parent).parts) for d in [pkg, *pkg.rglob("*")] if d.is_dir()}


def _base_package(module: str, is_init: bool, level: int) -> str:
    parts = module.split(".")
    if not is_init:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts)


def _known(name: str, known: set[str]) -> str | None:
    """``name`` if it is a module or package of ours, else its longest prefix that is, else None."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


class _Visitor(ast.NodeVisitor):
    """Collects imports (with where they sit) and functions (with their spans) of one module."""

    def __init__(self) -> None:
        self.scope: list[str] = []  # enclosing class/function names
        self.in_function = 0
        self.in_type_checking = 0
        self.imports: list[tuple[ast.Import | ast.ImportFrom, str]] = []
        self.functions: list[tuple[str, int, int]] = []

    def _kind(self) -> str:
        if self.in_function:
            return "function"
        return "type_checking" if self.in_type_checking else "module"

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.append((node, self._kind()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.imports.append((node, self._kind()))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.functions.append((".".join(self.scope), node.lineno, node.end_lineno or node.lineno))
        self.in_function += 1
        self.generic_visit(node)
        self.in_function -= 1
        self.scope.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        t = node.test
        tc = (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
            isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
        )
        if not tc:
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.in_type_checking += 1
        for child in node.body:
            self.visit(child)
        self.in_type_checking -= 1
        for child in node.orelse:
            self.visit(child)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_init: bool, known: set[str]
) -> tuple[list[str], bool]:
    """(package modules the import names, whether it imports argparse)."""
    found: list[str] = []
    uses_argparse = False
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == "argparse":
                uses_argparse = True
            if alias.name.split(".")[0] == PACKAGE and (m := _known(alias.name, known)):
                found.append(m)
        return found, uses_argparse
    if node.level:
        base = _base_package(module, is_init, node.level)
        name = f"{base}.{node.module}" if node.module else base
    else:
        name = node.module or ""
    if name.split(".")[0] == "argparse":
        uses_argparse = True
    if name.split(".")[0] != PACKAGE:
        return found, uses_argparse
    for alias in node.names:
        sub = f"{name}.{alias.name}"
        if alias.name != "*" and sub in known:
            found.append(sub)
        elif m := _known(name, known):
            found.append(m)
    return list(dict.fromkeys(found)), uses_argparse


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of the graph (iterative; each component sorted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(edges.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop(0)
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(edges.get(w, ()))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(sorted(comp))
    return comps


def analyse(src: str | Path, max_lines: int = DEFAULT_MAX_LINES) -> Analysis:
    """Analyse the ``mimkd`` package found under ``src``."""
    pkg = find_package(src)
    mods = _module_names(pkg)
    known = set(mods) | _packages(mods, pkg)
    root = pkg.parent
    long_functions: list[dict[str, Any]] = []
    edges: list[Edge] = []
    fn_imports: list[dict[str, Any]] = []
    argparse_files: list[str] = []
    for module, path in mods.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        v = _Visitor()
        v.visit(tree)
        for name, start, end in v.functions:
            if end - start + 1 > max_lines:
                long_functions.append({"file": rel, "line": start, "name": name, "lines": end - start + 1})
        uses_argparse = False
        for node, kind in v.imports:
            targets, ap = _targets(node, module, path.name == "__init__.py", known)
            uses_argparse |= ap
            for t in targets:
                if t != module:
                    edges.append(Edge(module, t, rel, node.lineno, kind))
            if targets and kind == "function":
                fn_imports.append({"file": rel, "line": node.lineno, "module": module, "imports": targets})
        if uses_argparse:
            argparse_files.append(rel)
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
    nodes = sorted(known)
    cycles = sorted((c for c in strongly_connected(nodes, graph) if len(c) > 1), key=lambda c: (-len(c), c))
    long_functions.sort(key=lambda f: (-f["lines"], f["file"], f["line"]))
    return Analysis(
        root=str(root),
        modules=sorted(mods),
        long_functions=long_functions,
        edges=edges,
        cycles=cycles,
        function_level_imports=fn_imports,
        argparse_files=argparse_files,
        max_lines=max_lines,
        files={m: p.relative_to(root).as_posix() for m, p in mods.items()},
    )


# -- output ----------------------------------------------------------------------------------------------
def format_markdown(a: Analysis) -> str:
    s = a.summary()
    lines = [
        "# mimkd architecture report",
        "",
        f"Source: `{a.root}` ({s['modules']} modules).",
        "",
        "| measure | count |",
        "|---|---|",
        f"| functions longer than {a.max_lines} lines | {s['functions_over_max_lines']} |",
        f"| import cycles (strongly connected components > 1 module) | {s['cycles']} |",
        f"| modules in cycles | {s['modules_in_cycles']} |",
        f"| function-level imports of mimkd modules | {s['function_level_imports']} |",
        f"| files importing argparse | {s['argparse_files']} |",
        f"| files importing argparse outside `mimkd/cli/` | {s['argparse_files_outside_cli']} |",
        "",
        f"## Functions longer than {a.max_lines} lines",
        "",
    ]
    lines += [f"- `{f['file']}:{f['line']}` {f['name']} ({f['lines']} lines)" for f in a.long_functions]
    lines += ["(none)"] if not a.long_functions else []
    lines += [
        "",
        "## Import cycles",
        "",
        "Edges count module-level (`module`), function-level (`function`) and `if TYPE_CHECKING:` "
        "(`type_checking`) imports alike.",
        "",
    ]
    for i, c in enumerate(a.cycles, 1):
        lines.append(f"### Cycle {i}: {len(c)} modules")
        lines.append("")
        lines.append(", ".join(f"`{m}`" for m in c))
        lines.append("")
        for e in a.cycle_edges(c):
            lines.append(f"- `{e.src}` → `{e.dst}` ({e.file}:{e.line}, {e.kind})")
        lines.append("")
    if not a.cycles:
        lines += ["(none)", ""]
    lines += ["## Function-level imports of mimkd modules", ""]
    per_file: dict[str, int] = {}
    for f in a.function_level_imports:
        per_file[f["file"]] = per_file.get(f["file"], 0) + 1
    lines += ["| file | count |", "|---|---|"] if per_file else ["(none)"]
    lines += [f"| `{f}` | {n} |" for f, n in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines += ["", "## Files importing argparse", ""]
    lines += [f"- `{f}`" for f in a.argparse_files] or ["(none)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[1] / "src"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES, help="long-function threshold")
    a = p.parse_args(argv)
    result = analyse(a.src, a.max_lines)
    out = json.dumps(result.to_json(), indent=2) + "\n" if a.json else format_markdown(result)
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
