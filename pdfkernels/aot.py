"""Ahead-of-time compile of every registered kernel configuration for real GPUs, on any machine.

    python -m pdfkernels.aot [--arch 80 90] [--only NAME]
    python -m pdfkernels.aot --profile [--only NAME]

Uses Triton's compiler with a CUDA target (no GPU needed) and the ``cuobjdump``/``nvdisasm`` that ship
in the Triton wheel. Prints one row per kernel x config x arch: registers, spill stack bytes, shared
memory, and whether sm_90 code uses wgmma. Exits non-zero on a failed compile, any spill, shared memory
over the SM's limit, or a config that expects wgmma on sm_90 and has none.

``--profile``: a static profile of the sm_90 code of every 16-bit configuration. For each innermost loop
that holds tensor-core instructions (found by its backward branch in the SASS), one iteration's
instruction mix per warp and the **issue clocks per MMA unit**: non-MMA warp instructions x (warps / 4)
/ (HGMMA FLOPs per iteration per CTA / (2 * 64 * 64 * 16)). Each SM sub-partition issues one instruction
per clock and the tensor cores need 32 clocks per 64x64x16 unit at peak, so a loop above ~32 cannot keep
them busy. Loops are named by a ``# loop: NAME`` comment on their ``for`` line. Fails when such code uses
mma.sync (HMMA) anywhere, or a loop exceeds the budget recorded beside its configuration
(``KernelConfig.budgets``), or a budget names no loop. A static model: no latencies, no occupancy.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
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


def _listing(compiled, *disasm_flags: str) -> tuple[str, str]:
    """The cubin's resource usage (``cuobjdump``) and its SASS (``nvdisasm`` with ``disasm_flags``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_bin("nvdisasm"), *disasm_flags, cubin], capture_output=True, text=True,
                              check=True).stdout
    return usage, sass


def _registers_and_spills(usage: str) -> tuple[int, int]:
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def inspect_config(config, arch: int) -> CompileReport:
    report = CompileReport(config.name, arch)
    try:
        compiled = _compile(config, arch)
    except Exception as exc:  # the report carries the compiler's message
        report.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        report.problems = ("compile failed",)
        return report
    usage, sass = _listing(compiled)
    static_shared = re.search(r"SHARED:(\d+)", usage)
    report.registers, report.spill_bytes = _registers_and_spills(usage)
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


MMA_UNIT_FLOP = 2 * 64 * 64 * 16
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_LOOP_NAME = re.compile(r"#\s*loop:\s*([\w-]+)")
# instruction classes counted per iteration (opcode prefixes)
_CLASSES = {"EX2": ("MUFU.EX2",), "sel": ("SEL", "FSEL"), "pred": ("ISETP", "FSETP", "PLOP3", "HSETP"),
            "cp.async": ("LDGSTS",), "LDG": ("LDG.", "LDG "), "TMA": ("UTMALDG", "UBLKCP"), "LDS/STS": ("LDS", "STS"),
            "bar": ("BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "SYNCS"), "spill": ("LDL", "STL")}


@dataclass
class LoopProfile:
    name: str  # "# loop:" name of its for line, else file:line
    instructions: int  # per warp and iteration
    hgmma: int
    hmma: int
    flop_per_cta: int  # HGMMA FLOPs per iteration per CTA
    counts: dict
    issue_clk_per_unit: float  # inf without HGMMA
    budget: float | None = None


@dataclass
class KernelProfile:
    name: str
    warps: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    hmma: int = 0  # mma.sync instructions anywhere in the kernel
    loops: list = field(default_factory=list)
    problems: tuple[str, ...] = ()


def _opcode(text: str) -> str:
    parts = text.split()
    return parts[1] if parts and parts[0].startswith("@") and len(parts) > 1 else (parts[0] if parts else "")


def _source_line(path: str, line: int, sources: dict[str, str] | None = None) -> str:
    """Line ``line`` of the source file the SASS names. ``sources`` maps file names to the files compiled
    now: a cubin from Triton's cache (keyed by the source's content) may name a copy of the same file at
    another path, since edited, so the current file with that name is read instead."""
    path = (sources or {}).get(Path(path).name, path)
    try:
        return Path(path).read_text().splitlines()[line - 1]
    except (OSError, IndexError):
        return ""


def profile_sass(sass: str, warps: int, sources: dict[str, str] | None = None) -> tuple[list[LoopProfile], int]:
    """The MMA loops of one kernel's ``nvdisasm -g`` listing (innermost loops only) and its HMMA count;
    ``sources``: see ``_source_line``."""
    instrs, labels, where = [], {}, ("", 0)
    pending = []
    for raw in sass.splitlines():
        if m := _LINE.search(raw):
            where = (m.group(1), int(m.group(2)))
        elif m := _LABEL.match(raw.strip()):
            pending.append(m.group(1))
        elif m := _INSTR.match(raw):
            for label in pending:
                labels[label] = len(instrs)
            pending = []
            instrs.append((_opcode(m.group(2)), m.group(2), where))
    spans = [(labels[t.group(1)], i) for i, (op, text, _) in enumerate(instrs)
             if op == "BRA" and (t := _TARGET.search(text)) and t.group(1) in labels and labels[t.group(1)] <= i]
    innermost = [(a, b) for a, b in spans if not any((c, d) != (a, b) and a <= c and d <= b for c, d in spans)]
    loops = []
    for start, end in sorted(innermost):
        body = instrs[start:end + 1]
        hgmma = [_HGMMA.match(op) for op, _, _ in body if op.startswith("HGMMA")]
        hmma = sum(op.startswith("HMMA") for op, _, _ in body)
        if not hgmma and not hmma:
            continue
        flop = sum(2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) for m in hgmma if m) * (warps // 4)
        other = len(body) - len(hgmma) - hmma
        clk = other * (warps / 4) / (flop / MMA_UNIT_FLOP) if flop else float("inf")
        path, line = body[-1][2]
        m = _LOOP_NAME.search(_source_line(path, line, sources))
        name = m.group(1) if m else f"{Path(path).name}:{line}"
        counts = {c: sum((op + " ").startswith(prefixes) for op, _, _ in body) for c, prefixes in _CLASSES.items()}
        loops.append(LoopProfile(name, len(body), len(hgmma), hmma, flop, counts, clk))
    return loops, sum(op.startswith("HMMA") for op, _, _ in instrs)


def profile_config(config, arch: int = 90) -> KernelProfile:
    """Compile ``config`` for ``arch`` and profile its MMA loops against ``config.budgets``."""
    report = KernelProfile(config.name, config.num_warps)
    try:
        compiled = _compile(config, arch)
    except Exception as exc:  # the report carries the compiler's message
        report.problems = (f"compile failed: {type(exc).__name__}",)
        return report
    usage, sass = _listing(compiled, "-g", "-c")
    report.registers, report.spill_bytes = _registers_and_spills(usage)
    report.shared_bytes = int(compiled.metadata.shared)
    kernel_file = inspect.getsourcefile(config.kernel.fn)
    report.loops, report.hmma = profile_sass(sass, config.num_warps, {Path(kernel_file).name: kernel_file})
    problems = []
    if config.expect_wgmma and report.hmma:
        problems.append(f"{report.hmma} mma.sync (HMMA) in sm_{arch} 16-bit code")
    if report.spill_bytes:
        problems.append(f"spills {report.spill_bytes} bytes")
    for name, budget in config.budgets.items():
        matching = [lp for lp in report.loops if lp.name == name]
        if not matching:
            problems.append(f"budget for loop '{name}', which has no MMA loop")
        for lp in matching:
            lp.budget = budget
            if not lp.issue_clk_per_unit <= budget:
                problems.append(f"loop '{name}' {lp.issue_clk_per_unit:.1f} issue clk/unit > budget {budget}")
    report.problems = tuple(problems)
    return report


def _is_16bit(config) -> bool:
    return any(t in config.signature.values() for t in ("*fp16", "*bf16"))


def profile_main(configs) -> int:
    configs = [c for c in configs if c.arch in (None, 90) and c.expect_wgmma and _is_16bit(c)]
    if not configs:
        print("no 16-bit sm_90 configurations matched", file=sys.stderr)
        return 1
    reports = [profile_config(c, 90) for c in configs]
    print("## Main loops, sm_90 (per iteration and warp; issue clk/unit: lower is better, > 32 starves the "
          "tensor cores)\n")
    print("| kernel[config] | loop | warps | instr | HGMMA | HMMA | MFLOP/CTA | EX2 | sel | pred | cp.async | "
          "LDG | TMA | LDS/STS | bar | spill | issue clk/unit | budget |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        for lp in r.loops:
            c = lp.counts
            print(f"| {r.name} | {lp.name} | {r.warps} | {lp.instructions} | {lp.hgmma} | {lp.hmma} | "
                  f"{lp.flop_per_cta / 1e6:.2f} | {c['EX2']} | {c['sel']} | {c['pred']} | {c['cp.async']} | "
                  f"{c['LDG']} | {c['TMA']} | {c['LDS/STS']} | {c['bar']} | {c['spill']} | "
                  f"{lp.issue_clk_per_unit:.1f} | {'-' if lp.budget is None else lp.budget} |")
    print("\n| kernel[config] | warps | registers | spill bytes | shared bytes | HMMA | status |")
    print("|---|---|---|---|---|---|---|")
    for r in reports:
        status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
        print(f"| {r.name} | {r.warps} | {r.registers} | {r.spill_bytes} | {r.shared_bytes} | {r.hmma} | {status} |")
    failed = sum(bool(r.problems) for r in reports)
    print(f"\n{len(reports) - failed} profiled within budget, {failed} failed")
    return 1 if failed else 0


def all_configs() -> list:
    """Every shipped configuration: each op module registers its own on import (one-way: aot -> ops -> registry)."""
    from . import gaussian_mim, gaussian_pairwise, prefix_attention_tiles  # noqa: F401
    from .registry import KERNEL_CONFIGS

    return list(KERNEL_CONFIGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--only", default=None, help="only configs whose name contains this")
    parser.add_argument("--profile", action="store_true",
                        help="static sm_90 loop profile of the 16-bit configs, checked against their budgets")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its 3.9 warning

    configs = [c for c in all_configs() if args.only is None or args.only in c.name]
    if not configs:
        print("no kernel configurations matched", file=sys.stderr)
        return 1
    if args.profile:
        return profile_main(configs)
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
