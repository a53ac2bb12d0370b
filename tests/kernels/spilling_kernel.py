"""A kernel built to spill (a 128x128 fp32 accumulator in one warp), to prove the aot check catches it."""

import triton
import triton.language as tl


@triton.jit
def spilling_kernel(a_ptr, b_ptr, out_ptr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + rows[:, None] * BLOCK + rows[None, :])
    b = tl.load(b_ptr + rows[:, None] * BLOCK + rows[None, :])
    acc = tl.dot(a, b) + tl.dot(b, a)
    tl.store(out_ptr + rows[:, None] * BLOCK + rows[None, :], acc)
