"""Ahead-of-time compile of every registered kernel configuration for real GPUs, on any machine.

    python -m pdfkernels.aot [--arch 80 90] [--only NAME]

Uses Triton's compiler with a CUDA target (no GPU needed) and the ``cuobjdump``/``nvdisasm`` that ship
in the Triton wheel. Prints one row per kernel x config x arch: registers, spill stack bytes, shared
memory, and whether sm_90 code uses wgmma. Exits non-zero on a failed compile, any spill, shared memory
over the SM's limit, or a config that expects wgmma on sm_90 and has none.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Opt-in shared memory per block: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class CompileReport:
    name: str
    arch: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    wgmma: bool = False
    error: str = ""
    problems: tuple[str, ...] = ()


def _nvidia_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise FileNotFoundError(f"{tool} not found at {path}: this Triton wheel does not ship CUDA tools")
    return str(path)


def _compile(config, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = config.kernel
    constexprs = {(fn.arg_names.index(k),): v for k, v in config.constexprs.items()}
    # Pointers are 16-byte aligned at run time (torch allocations), as Triton specialises them.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if config.signature.get(name, "").startswith("*") or name in config.multiple_of_16}
    src = ASTSource(fn=fn, signature=config.signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def inspect_config(config, arch: int) -> CompileReport:
    report = CompileReport(config.name, arch)
    try:
        compiled = _compile(config, arch)
    except Exception as exc:  # the report carries the compiler's message
        report.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        report.problems = ("compile failed",)
        return report
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_bin("nvdisasm"), cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    static_shared = re.search(r"SHARED:(\d+)", usage)
    report.registers = int(regs.group(1)) if regs else -1
    report.spill_bytes = int(stack.group(1)) if stack else -1
    report.shared_bytes = int(compiled.metadata.shared) + (int(static_shared.group(1)) if static_shared else 0)
    report.wgmma = "HGMMA" in sass.upper() or "wgmma" in compiled.asm["ptx"]
    problems = []
    if report.spill_bytes != 0:
        problems.append(f"spills {report.spill_bytes} bytes")
    if report.shared_bytes > SHARED_LIMIT.get(arch, SHARED_LIMIT[80]):
        problems.append(f"shared memory {report.shared_bytes} > {SHARED_LIMIT.get(arch)}")
    if arch >= 90 and config.expect_wgmma and not report.wgmma:
        problems.append("no wgmma on sm_90")
    report.problems = tuple(problems)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--only", default=None, help="only configs whose name contains this")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its 3.9 warning

    from .registry import load_all

    configs = [c for c in load_all() if args.only is None or args.only in c.name]
    if not configs:
        print("no kernel configurations matched", file=sys.stderr)
        return 1
    print("| kernel[config] | arch | warps | stages | registers | spill bytes | shared bytes | wgmma | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = compiled = 0
    for config in configs:
        for arch in [a for a in args.arch if config.arch in (None, a)]:
            r = inspect_config(config, arch)
            status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
            if r.error:
                status += f" ({r.error})"
            failed += bool(r.problems)
            compiled += 1
            wgmma = ("yes" if r.wgmma else "no") if arch >= 90 else "-"
            print(f"| {r.name} | sm_{arch} | {config.num_warps} | {config.num_stages} | {r.registers} | "
                  f"{r.spill_bytes} | {r.shared_bytes} | {wgmma} | {status} |", flush=True)
    print(f"\n{compiled - failed} compiled cleanly, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
