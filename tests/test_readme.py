"""Every ```python snippet of README.md runs as written, top to bottom in one session (issue 17)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import atofx

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_its_snippets():
    blocks = python_blocks()
    assert len(blocks) >= 6 and any("ato.train(" in b for b in blocks) and any("atofx.load(" in b for b in blocks)


def test_every_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the snippets write small.pt, run/ and a picture
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", atofx.AtofxWarning)  # a snippet that deserves a warning is a bad example
        for i, block in enumerate(python_blocks()):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "small.pt").exists() and list((tmp_path / "run").glob("checkpoint*.pt"))
    assert isinstance(namespace["again"], __import__("torch").fx.GraphModule)
