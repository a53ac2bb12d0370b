"""The result schema: quantiles, TFLOP/s and MFU from the device peak table, refusals, and the markdown row."""

import pytest

from pdfkernels.bench.peaks import peak_tflops
from pdfkernels.bench.schema import FIELDS, markdown, quantile, row, timed_info

META = {"torch": "2.x", "triton": "3.x", "transformers": "5.x", "commit": "abc", "date": "2026-01-01"}


def _record(device, flops=2e12, data=(0.004, 0.001, 0.003, 0.002, 0.005)):
    info = timed_info("p", "fwd+bwd", "S1xL8", "bfloat16", device, "lib 1.0", flops=flops,
                      peak_extra_bytes=3 * 2**20, backend="flash")
    ordered = sorted(data)
    return {"name": "test_x[p-L8]", "extra_info": info,
            "stats": {"data": list(data), "median": ordered[len(ordered) // 2]}}


def test_quantile_interpolates_between_ranks():
    assert quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.2) == pytest.approx(1.8)
    assert quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.8) == pytest.approx(4.2)
    assert quantile([7.0], 0.8) == 7.0


@pytest.mark.parametrize("device,peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                         ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 PCIe", None),
                                         ("cpu", None)])
def test_peak_table(device, peak):
    assert peak_tflops(device) == peak


def test_row_has_every_field_and_the_mfu_of_the_device():
    r = row("prefix_attention", _record("NVIDIA H200"), META)
    assert set(FIELDS) <= set(r)
    assert r["median_ms"] == pytest.approx(3.0) and r["q20_ms"] == pytest.approx(1.8)
    assert r["tflops"] == pytest.approx(2e12 / 0.003 / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"] / 989.0)
    assert r["peak_extra_mib"] == pytest.approx(3.0)
    assert r["versions"] == {"torch": "2.x", "triton": "3.x", "transformers": "5.x", "provider": "lib 1.0"}
    assert r["extra"] == {"backend": "flash"} and r["case"] == "p-L8"
    assert "| p | fwd+bwd | S1xL8 | bfloat16 | 3.000 | 1.800 | 4.200 |" in markdown([r])


def test_cpu_rows_have_no_mfu():
    r = row("models", _record("cpu"), META)
    assert r["mfu"] is None and r["tflops"] is not None
    assert "n/a (cpu)" in markdown([r])


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="mode"):
        timed_info("p", "forward", "s", "fp32", "cpu", "lib")
    with pytest.raises(ValueError, match="timed_info"):
        row("x", {"name": "t", "extra_info": {"provider": "p"}, "stats": {"data": [1.0], "median": 1.0}}, META)
