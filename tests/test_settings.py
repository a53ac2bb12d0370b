"""One parser for every variable: defaults, case folding where the variable allows it, a clear refusal."""

import pytest

from pdfkernels import settings


def test_unset_gives_the_default_and_values_are_stripped(monkeypatch):
    monkeypatch.delenv(settings.TMA.name, raising=False)
    assert settings.get(settings.TMA) == "auto"
    monkeypatch.setenv(settings.TMA.name, " 1 ")
    assert settings.get(settings.TMA) == "1"
    monkeypatch.setenv(settings.BACKEND.name, "Torch")
    assert settings.get(settings.BACKEND) == "torch"


def test_a_switch_outside_its_choices_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(settings.POISON.name, "yes")
    with pytest.raises(ValueError, match=r"PDFKERNELS_POISON expected one of \('0', '1'\), got 'yes'"):
        settings.on(settings.POISON)
    monkeypatch.setenv(settings.POISON.name, "1")
    assert settings.on(settings.POISON)


def test_every_variable_read_in_the_package_is_in_the_table():
    import re
    from pathlib import Path

    root = Path(settings.__file__).resolve().parents[1]
    named = set()
    for folder in ("pdfkernels", "models", "train", "bench", "integrations", "tests"):
        for path in (root / folder).rglob("*.py"):
            named |= set(re.findall(r"PDFKERNELS_[A-Z_]+", path.read_text()))
    assert named <= {k.name for k in settings.KNOBS}


def test_the_docs_table_has_a_row_per_variable():
    from pathlib import Path

    readme = (Path(settings.__file__).resolve().parents[1] / "docs" / "ops.md").read_text()
    for name in [k.name for k in settings.KNOBS] + ["TRITON_INTERPRET"]:
        assert f"| `{name}` |" in readme, name
