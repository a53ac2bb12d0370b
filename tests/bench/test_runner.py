"""python -m pdfkernels.bench: the quick CPU run prints the tables in the one schema, CPU-labelled with no MFU,
the train step's phases and the headline ratio, and writes the JSON with device, versions and figures."""

import json
import subprocess
import sys
from pathlib import Path

from pdfkernels.baselines import SDPA_KERNELS
from pdfkernels.bench.schema import FIELDS

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_json_and_table(tmp_path):
    env_cmd = [sys.executable, "-m", "bench", "--quick", "--only", "table4", "models", "train_step",
               "--out", str(tmp_path)]
    done = subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "| TFLOPs, baseline |" in out and "## models (CPU figures: no MFU)" in out
    assert "| provider | mode | shape | dtype | median ms | q20 ms | q80 ms | TFLOP/s | MFU |" in out
    assert "n/a (cpu)" in out and "| optimizer |" in out and "wall clock (CPU)" in out
    assert "PDF / plain = " in out
    (path,) = tmp_path.glob("cpu-*-quick.json")
    result = json.loads(path.read_text())
    assert {"device", "torch", "triton", "transformers", "commit", "date"} <= set(result)
    assert len(result["table4"]) == 7
    rows = result["benchmarks"]
    assert {r["provider"] for r in rows if r["part"] == "models"} == {"unpatched", "no-prefix", "single-prefix",
                                                                      "two-paths"}
    assert {r["provider"] for r in rows if r["part"] == "train_step"} == {"baseline", "pdf"}
    for r in rows:
        assert set(FIELDS) <= set(r)
        assert 0 < r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["device"] == "cpu" and r["mfu"] is None and r["tflops"] > 0 and r["commit"] == result["commit"]
    steps = {r["provider"]: r for r in rows if r["part"] == "train_step"}
    assert steps["pdf"]["flops"] > steps["baseline"]["flops"]
    assert steps["pdf"]["extra"]["flop_count"]["calls"]["text_backward"] >= 2  # queries and targets


def test_quick_prefix_attention_lists_the_peers_and_their_backends(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "prefix_attention", "--select",
           "prefix_attention=fwd+bwd and not K0", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = tmp_path.glob("cpu-*-quick.json")
    rows = json.loads(path.read_text())["benchmarks"]
    assert {r["provider"] for r in rows} == {"pdfkernels-varlen", "pdfkernels-padded", "sdpa-mask", "sdpa-lower-right"}
    for r in rows:
        assert r["mode"] == "fwd+bwd" and r["extra"]["backend"] and r["versions"]["provider"]
    assert {r["extra"]["backend"] for r in rows if r["provider"].startswith("sdpa")} <= set(SDPA_KERNELS.values())
    for missing in ("sdpa-cudnn", "flex", "flash-attn-varlen"):  # listed with the reason, not silently absent
        assert f"- {missing}: " in done.stdout
    assert "peer / ours = " in done.stdout
