"""python -m pdfkernels.bench: the quick CPU run prints the table and writes the JSON with device, versions and
figures."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_json_and_table(tmp_path):
    env_cmd = [sys.executable, "-m", "bench", "--quick", "--only", "table4", "models", "--out", str(tmp_path)]
    done = subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| TFLOPs, baseline |" in done.stdout and "| models |" in done.stdout
    (path,) = tmp_path.glob("cpu-*-quick.json")
    result = json.loads(path.read_text())
    assert {"device", "torch", "triton", "transformers", "commit", "date"} <= set(result)
    assert len(result["table4"]) == 7
    variants = {r["variant"] for r in result["benchmarks"]}
    assert variants == {"unpatched", "no-prefix", "single-prefix", "two-paths"}
    for r in result["benchmarks"]:
        assert 0 < r["seconds"]["min"] <= r["seconds"]["median"] <= r["seconds"]["max"]
        assert r["device"] == "cpu"
