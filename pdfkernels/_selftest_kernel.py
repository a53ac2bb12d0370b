"""A tiny kernel that proves the build and ahead-of-time compile machinery until real kernels land.

``out = a * x + y`` elementwise, with a launcher so it also runs (under the interpreter on a CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelConfig, configs_for, register


@triton.jit
def axpy_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=inside).to(tl.float32)
    tl.store(out_ptr + offsets, (a * x + y).to(out_ptr.dtype.element_ty), mask=inside)


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
for _dtype, _name in _TRITON_TYPES.items():
    register(KernelConfig(
        axpy_kernel, _name,
        signature={"x_ptr": f"*{_name}", "y_ptr": f"*{_name}", "out_ptr": f"*{_name}", "a": "fp32", "n": "i32",
                   "BLOCK": "constexpr"},
        constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1))


def axpy(a: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``a * x + y`` with the registered configuration of x's dtype (contiguous 1-D inputs)."""
    (config,) = [c for c in configs_for(axpy_kernel) if c.variant == _TRITON_TYPES[x.dtype]]
    out = torch.empty_like(x)
    block = config.constexprs["BLOCK"]
    axpy_kernel[(triton.cdiv(x.numel(), block),)](x, y, out, a, x.numel(), BLOCK=block,
                                                   num_warps=config.num_warps, num_stages=config.num_stages)
    return out
