"""The README's Python API example runs as written and teaches the student something."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_own_training_loop_example_runs():
    text = README.read_text()
    section = text[text.index("### Your own training loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["accuracy"] > 0.7  # chance is 0.1 (measured 0.838 on the development CPU)
    assert any(n.startswith("critic") or "critic" in n for n, _ in namespace["distiller"].named_parameters())
    assert not any(n.startswith("teacher.") for n, _ in namespace["distiller"].trainable_named_parameters())
