"""Peak extra memory of one call: CUDA allocator statistics on GPUs, a fresh process's peak RSS on CPUs.

On a CPU the call runs in a new interpreter (``python -m pdfkernels.bench.memory MODULE:FUNCTION ARGS...``) so that its
high-water mark is its own: forking a process whose thread pools are running can deadlock.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ru_maxrss is no use here: it keeps the peak of the
    parent that forked this process, carried across exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_extra_bytes(target: str, *args: object) -> int:
    """Run ``target(*args)`` (``"module:function"``, returning a zero-argument callable after building its
    inputs) in a new process; bytes of peak RSS beyond the RSS once the inputs exist."""
    out = subprocess.run([sys.executable, "-m", "pdfkernels.bench.memory", target, json.dumps(args)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _main() -> None:
    module, function = sys.argv[1].split(":")
    call = getattr(importlib.import_module(module), function)(*json.loads(sys.argv[2]))
    _reset_peak_rss()  # inputs exist and the target has warmed up
    before = _status_bytes("VmRSS")
    call()
    print(_status_bytes("VmHWM") - before)


if __name__ == "__main__":
    _main()
