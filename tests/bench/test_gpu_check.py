"""bench/gpu_check.sh --dry-run: the headline stage runs first among the benchmarks, the worst-case stage limits fit
the budget (under 8 minutes), and every benchmark command names real parts."""

import re
import subprocess
from pathlib import Path

from pdfkernels.bench.__main__ import TIMED

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _stages(tmp_path, budget=None):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)} | ({"GPU_CHECK_BUDGET_S": str(budget)} if budget else {})
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return re.findall(r"^stage (\S+): limit (\d+)s, log \S+: (.*)$", done.stdout, flags=re.M), done.stdout


def test_headline_first_and_the_stages_fit_the_budget(tmp_path):
    stages, out = _stages(tmp_path)
    names = [n for n, _, _ in stages]
    assert names[:3] == ["install", "versions", "headline"]
    assert [n for n, _, cmd in stages if "pdfkernels.bench" in cmd][0] == "headline"
    assert "L2048 and fwd+bwd" in stages[2][2] and "train_step" in stages[2][2]
    assert sum(int(limit) for _, limit, _ in stages) <= 470 < 480
    assert f"OUT={tmp_path}" not in out and str(tmp_path) in out  # results under $OUT
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_a_smaller_budget_cuts_the_later_stages(tmp_path):
    stages, _ = _stages(tmp_path, budget=120)
    assert sum(int(limit) for _, limit, _ in stages) <= 120
    assert dict((n, int(limit)) for n, limit, _ in stages)["kernel-tests-on-cuda"] == 0


def test_benchmark_commands_name_real_parts(tmp_path):
    stages, _ = _stages(tmp_path)
    for _, _, cmd in stages:
        if "pdfkernels.bench" not in cmd:
            continue
        only = re.search(r"--only ((?:\w+ )+)", cmd).group(1).split()
        assert only and set(only) <= set(TIMED)
        for part in re.findall(r"--select (\w+)=", cmd):
            assert part in only


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--fast" in done.stderr
