"""Table 4 on the meta device reproduces the paper within 0.1% (parameter rows, baseline and aggregate TFLOPs)."""

import pytest

from pdfkernels.bench.table4 import flop_rows, parameter_rows, table


def test_exact_parameter_counts():
    p = parameter_rows()
    assert (p["vlm2vec_trainable"], p["vlm2vec_total"]) == (4_673_536, 2_213_659_136)
    assert (p["prefix"], p["aggregator"]) == (573_440, 4_723_202)
    assert (p["pdf_trainable"], p["pdf_total"]) == (9_970_178, 2_218_955_778)


def test_flops_follow_the_counting_convention():
    f = flop_rows()
    assert f["tokens"] == 2314
    assert f["baseline"] / 1e12 == pytest.approx(18.9248, abs=5e-4)


def test_rows_match_the_paper():
    _, rows = table()
    for r in rows:
        assert abs(r["difference_pct"]) < 0.1, r["row"]
