"""CI (``.ci/run``) runs README.md's two commands as they are written, so the two can never drift apart.

The README's first command is ``bash scripts/setup.sh && .venv/bin/mimkd demo``: CI must run its set-up part
as a command of its own (no ``--dev``: that path once exited 1 silently while CI only ran ``--dev``), then the
demo, shortened by flags only. The second command must appear verbatim, its failure not swallowed by
``set -e`` (which ignores a failure left of ``&&``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from mimkd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci" / "run"
OPERATORS = {"&&", "||", ";", "|", "&"}
# the only flags CI may add to the README's `mimkd demo`: the ones that shorten it or keep it out of ~
SHORTENING = {"--seeds", "--epochs", "--teacher-epochs", "--cache", "--out"}


def _readme_commands() -> list[str]:
    block = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert block, "README.md has no ```bash block"
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert len(lines) >= 2, lines
    return lines[:2]


def _tokens(command: str) -> list[str]:
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def _simple_commands(tokens: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in OPERATORS:
            out.append([])
        else:
            out[-1].append(t)
    return [c for c in out if c]


def _ci_lines() -> list[str]:
    """The command lines of .ci/run: comments and blank lines dropped, continuation lines joined."""
    text = CI.read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _find(lines: list[str], pred) -> int:
    for i, line in enumerate(lines):
        if any(pred(c) for c in _simple_commands(_tokens(line))):
            return i
    return -1


def test_readme_first_bash_block_is_the_two_commands():
    first, second = _readme_commands()
    assert _simple_commands(_tokens(first)) == [["bash", "scripts/setup.sh"], [".venv/bin/mimkd", "demo"]]
    assert _tokens(first)[2] == "&&" and _tokens(second)[3] == "&&"
    assert _simple_commands(_tokens(second))[0] == ["bash", "scripts/setup.sh", "--dev"]


def test_ci_runs_the_readme_commands_as_written():
    first, second = _readme_commands()
    setup_part, demo_part = _simple_commands(_tokens(first))
    lines = _ci_lines()
    text = CI.read_text()
    assert "set -euo pipefail" in lines, "the CI script must keep set -euo pipefail"

    # 1. the first command's set-up part, exactly (no --dev), as a command of its own
    i_setup = _find(lines, lambda c: c == setup_part)
    assert i_setup >= 0, f".ci/run never runs {shlex.join(setup_part)!r} (without --dev) on its own"

    # 2. the first command's demo, with shortening flags only, which the CLI accepts
    i_demo = _find(lines, lambda c: c[: len(demo_part)] == demo_part)
    assert i_demo >= 0, f".ci/run never runs {shlex.join(demo_part)!r}"
    demo = next(c for c in _simple_commands(_tokens(lines[i_demo])) if c[: len(demo_part)] == demo_part)
    extra = demo[len(demo_part) :]
    flags = {t for t in extra if t.startswith("-")}
    assert flags <= SHORTENING, f"CI's demo differs from the README's by more than shortening: {flags}"
    args = build_parser().parse_args(demo[1:])
    assert args.command == "demo" and args.seeds >= 1 and args.progress is None

    # 3. the second command verbatim, its failure not swallowed by set -e
    assert second in text, f".ci/run does not contain the README's second command {second!r}"
    want = _tokens(second)
    runs = [i for i, line in enumerate(lines) if _tokens(line)[: len(want)] == want]  # not in an echo
    assert runs, f".ci/run has {second!r} only inside another command, never as a command line"
    i_second = runs[0]
    rest = _tokens(lines[i_second])[len(want) :]
    last = i_second == len(lines) - 1
    assert (last and not rest) or rest[:1] == ["||"], (
        f"a failure of {second!r} must fail CI: end the script with it or follow it with '|| <exit>'"
    )

    assert i_setup < i_demo < i_second, "CI must set up without --dev, run the demo, then the second command"


def test_ci_demo_flags_reach_the_demo(monkeypatch):
    import mimkd.demo

    seen = {}
    monkeypatch.setattr(mimkd.demo, "run_demo", lambda **kw: seen.update(kw))
    _, demo_part = _simple_commands(_tokens(_readme_commands()[0]))
    demo = next(
        c for line in _ci_lines() for c in _simple_commands(_tokens(line)) if c[: len(demo_part)] == demo_part
    )
    args = build_parser().parse_args(demo[1:])
    assert args.fn(args) == 0
    assert seen["teacher_epochs"] == args.teacher_epochs and seen["epochs"] == args.epochs
    assert seen["seeds"] == args.seeds and seen["out_dir"] == args.out and seen["cache_dir"] == args.cache
    assert build_parser().parse_args(["demo"]).teacher_epochs is None  # the demo's own
