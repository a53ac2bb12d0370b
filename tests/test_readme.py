"""The README's Python examples run as written (except the VLM2Vec snippet, which needs the user's model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "your unchanged" not in b]


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, monkeypatch):
    monkeypatch.setenv("PDFKERNELS_BACKEND", "torch")
    exec(compile(code, str(README), "exec"), {})
