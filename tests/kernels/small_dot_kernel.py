"""A loop of 16-bit dots, to prove the static profile finds loops, counts MMAs and enforces its rules:
BLOCK=16 runs on mma.sync (HMMA) on sm_90, BLOCK=64 on wgmma (HGMMA)."""

import triton
import triton.language as tl


@triton.jit
def small_dot_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    tile = rows[:, None] * BLOCK + rows[None, :]
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for i in range(0, n):  # loop: small-dot
        acc += tl.dot(tl.load(a_ptr + i * BLOCK * BLOCK + tile), tl.load(b_ptr + i * BLOCK * BLOCK + tile))
    tl.store(out_ptr + tile, acc)
