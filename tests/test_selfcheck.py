"""The main job's self-check runs every op and reports agreement."""

from pdfkernels import selfcheck, settings


def test_selfcheck_passes_and_prints_a_row_per_op(capsys):
    assert selfcheck.main([]) == 0
    out = capsys.readouterr().out
    for op, _, _ in selfcheck.CASES:
        assert f"| {op} |" in out
    assert f"{len(selfcheck.CASES)} of {len(selfcheck.CASES)} ops agree" in out


def test_selfcheck_env_lists_every_variable_with_its_value(capsys, monkeypatch):
    monkeypatch.setenv("PDFKERNELS_TMA", "0")
    assert selfcheck.main(["--env"]) == 0
    out = capsys.readouterr().out
    for knob in settings.KNOBS:
        assert f"| {knob.name} |" in out
    assert "| PDFKERNELS_TMA | 0 |" in out
    assert "| TRITON_INTERPRET |" in out
