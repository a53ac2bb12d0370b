"""The ahead-of-time compile check: registered kernels build for sm_80/sm_90, and problems are caught.

Compiling needs real JIT functions, so these run in a subprocess without the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_registered_configs_compile_without_spills():
    from pdfkernels.registry import load_all

    result = _run(["-m", "pdfkernels.aot", "--arch", "80", "90"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| sm_" in line]
    assert len(rows) == sum(1 if c.arch else 2 for c in load_all())
    assert all(row.rstrip().endswith("| ok |") for row in rows)


INSPECT = """
import json, sys
from pdfkernels import aot
from pdfkernels.registry import KernelConfig
from tests.kernels.spilling_kernel import spilling_kernel
sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"}
spill = KernelConfig(spilling_kernel, "one warp", signature=sig, constexprs={"BLOCK": 128}, num_warps=1,
                     num_stages=1, expect_wgmma=True)
broken = KernelConfig(spilling_kernel, "bad signature", signature={"a_ptr": "*fp32"}, constexprs={"BLOCK": 16})
print(json.dumps([aot.inspect_config(spill, 90).__dict__, aot.inspect_config(broken, 80).__dict__]))
"""


def test_spills_and_failed_compiles_are_reported():
    result = _run(["-c", INSPECT])
    assert result.returncode == 0, result.stderr
    spill, broken = json.loads(result.stdout.splitlines()[-1])
    assert not spill["error"] and spill["registers"] > 0
    assert spill["spill_bytes"] > 0
    assert any("spills" in p for p in spill["problems"])
    assert broken["problems"] == ["compile failed"] and broken["error"]
