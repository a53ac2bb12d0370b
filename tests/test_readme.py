"""The README's and the docs pages' Python examples run as written (except the VLM2Vec snippet, which needs the
user's model)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, b) for page in PAGES for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
          if "your unchanged" not in b]


@pytest.mark.parametrize("page, code", BLOCKS, ids=[f"{page.stem}-block{i}" for i, (page, _) in enumerate(BLOCKS)])
def test_readme_example_runs(page, code, monkeypatch):
    monkeypatch.setenv("PDFKERNELS_BACKEND", "torch")
    exec(compile(code, str(page), "exec"), {})


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name
