"""The main job's self-check runs every op and reports agreement."""

from pdfkernels import selfcheck


def test_selfcheck_passes_and_prints_a_row_per_op(capsys):
    assert selfcheck.main([]) == 0
    out = capsys.readouterr().out
    for op, _, _ in selfcheck.CASES:
        assert f"| {op} |" in out
    assert f"{len(selfcheck.CASES)} of {len(selfcheck.CASES)} ops agree" in out
