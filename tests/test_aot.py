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
    from pdfkernels.aot import all_configs

    result = _run(["-m", "pdfkernels.aot", "--arch", "80", "90"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| sm_" in line]
    assert len(rows) == sum(1 if c.arch else 2 for c in all_configs())
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


def test_profile_of_shipped_sm90_code_is_within_budget():
    from pdfkernels.aot import all_configs

    result = _run(["-m", "pdfkernels.aot", "--profile", "--only", "bf16 D=128"])
    assert result.returncode == 0, result.stdout + result.stderr
    loops = {(row.split("|")[1].strip(), row.split("|")[2].strip()): row for row in result.stdout.splitlines()
             if row.startswith("| ") and "issue clk" not in row and row.count("|") == 19}
    budgeted = [(c.name, name) for c in all_configs() if c.arch == 90 and "bf16 D=128" in c.name
                for name in c.budgets]
    assert budgeted, "the shipped sm_90 head_dim-128 configs record loop budgets"
    for key in budgeted:
        assert key in loops, f"no profiled loop {key}"
        clk, budget = (float(x) for x in loops[key].split("|")[-3:-1])
        assert clk <= budget
    assert "0 failed" in result.stdout


PROFILE = """
import json
from pdfkernels import aot
from pdfkernels.registry import KernelConfig
from tests.kernels.small_dot_kernel import small_dot_kernel
sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
def config(block, budgets):
    return KernelConfig(small_dot_kernel, f"B{block}", signature=sig, constexprs={"BLOCK": block}, num_warps=4,
                        num_stages=2, expect_wgmma=True, budgets=budgets)
out = []
for block, budgets in ((16, {}), (64, {"small-dot": 0.5}), (64, {"small-dot": 1000.0, "missing": 1.0})):
    r = aot.profile_config(config(block, budgets), 90)
    out.append(dict(hmma=r.hmma, problems=r.problems, loops=[(lp.name, lp.hgmma, lp.hmma, lp.issue_clk_per_unit)
                                                             for lp in r.loops]))
print(json.dumps(out))
"""


def test_profile_flags_mma_sync_and_budgets():
    result = _run(["-c", PROFILE])
    assert result.returncode == 0, result.stderr
    mma_sync, over_budget, missing = json.loads(result.stdout.splitlines()[-1])
    assert mma_sync["hmma"] > 0 and any("mma.sync" in p for p in mma_sync["problems"])
    (name, hgmma, hmma, clk), = over_budget["loops"]
    assert name == "small-dot" and hgmma > 0 and hmma == 0 and clk > 0.5
    assert any("budget 0.5" in p for p in over_budget["problems"])
    assert missing["problems"] == ["budget for loop 'missing', which has no MMA loop"]


def test_loop_names_come_from_the_file_compiled_now(tmp_path):
    """A cubin from Triton's cache can name a copy of the kernel file at another path (a clone, a worktree),
    since edited: loop names are read from the current file of that name."""
    from pdfkernels import aot

    current = tmp_path / "kernels.py"
    current.write_text("x = 1\nfor i in range(3):  # loop: main\n")
    stale = tmp_path / "elsewhere" / "kernels.py"
    stale.parent.mkdir()
    stale.write_text("# edited since\n\n")
    assert aot._source_line(str(stale), 2) == ""
    assert "loop: main" in aot._source_line(str(stale), 2, {"kernels.py": str(current)})
