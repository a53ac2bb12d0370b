"""The tiles of the prefix attention kernels: the table per kernel, dtype, head_dim and architecture, its
registration (each entry compiled ahead of time by ``python -m pdfkernels.aot``) and the candidates of one
launch (timed once per shape on GPUs by ``pdfkernels.autotune``; the launch itself is in ``prefix_attention``).
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
import triton

from . import backend, registry
from .prefix_attention_kernels import (
    prefix_attention_bwd_dkdv_kernel,
    prefix_attention_bwd_dprefix_kernel,
    prefix_attention_bwd_dq_kernel,
    prefix_attention_fwd_kernel,
)
from .prefix_attention_tma import DESC_ROWS, tma_arch
from .registry import KernelConfig, register

_TL_TYPES = backend.TRITON_TYPES
HEAD_DIMS = (64, 80, 96, 128)
ARCHS = (80, 90)  # tuned for A100-class and H100-class GPUs; newer GPUs use the sm_90 tiles
_KERNELS = (prefix_attention_fwd_kernel, prefix_attention_bwd_dkdv_kernel, prefix_attention_bwd_dq_kernel,
            prefix_attention_bwd_dprefix_kernel)
_TRITON_LINE = tuple(int(p) for p in triton.__version__.split(".")[:2])
# pipeline stages of the sm_90 16-bit dK/dV and head_dim-128 dprefix pointer kernels: the most that each
# Triton line compiles without spills (``python -m pdfkernels.aot`` fails on a spill)
_SM90_BWD_STAGES = 1 if _TRITON_LINE < (3, 7) else 2


def _tile(kernel, dtype: torch.dtype, head_dim: int, arch: int, tma: bool) -> dict:
    """The tiles, launch parameters and static-profile budgets per kernel, dtype, head_dim and
    architecture: the one source for launches and for ``python -m pdfkernels.aot`` (which fails on any spill;
    it prints the registers and spills of the installed Triton). The sm_90 16-bit dK/dV and head_dim-128
    dprefix kernels are pipelined per Triton line (``_SM90_BWD_STAGES``). ``budgets``: the most issue clocks
    per 64x64x16 MMA unit that ``python -m pdfkernels.aot --profile`` accepts for the named loop (``# loop:``
    in the kernels) on sm_90; measured figures plus a small margin.

    BLOCK_M counts query rows, BLOCK_N keys (own or prefix). dK/dV: BLOCK_N keys are the MMA's M operand
    (>= 64 per warpgroup on sm_90) and a multiple of BLOCK_M (the causal diagonal is whole query tiles).
    TMA variants take the same tiles (dprefix: its partial buffers follow them); the head_dim-128 TMA
    dprefix pipelines two stages on both Triton lines (TMA frees the address registers)."""
    tiles = _pointer_tile(kernel, dtype, head_dim, arch)
    if tma and kernel is prefix_attention_bwd_dprefix_kernel:
        tiles["num_stages"] = 2
    return tiles


def _pointer_tile(kernel, dtype: torch.dtype, head_dim: int, arch: int) -> dict:
    wide = head_dim > 64
    if dtype == torch.float32:  # full-precision (ieee) dots run on CUDA cores: small tiles, no spills
        if kernel is prefix_attention_bwd_dkdv_kernel:  # sm_90 with 8 warps spills
            return dict(BLOCK_M=16, BLOCK_N=32, num_warps=8 if wide and arch < 90 else 4, num_stages=1)
        if kernel is prefix_attention_bwd_dq_kernel and wide and arch >= 90:
            return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8 if wide else 4, num_stages=1)
    if arch >= 90:
        if kernel is prefix_attention_fwd_kernel:
            return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2,
                        budgets={"fwd-own": 20.0, "fwd-prefix": 22.0} if head_dim == 128 else {})
        if kernel is prefix_attention_bwd_dkdv_kernel:
            return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=_SM90_BWD_STAGES,
                        budgets={"dkdv": 25.0} if head_dim == 128 else {})
        if kernel is prefix_attention_bwd_dq_kernel:  # 64-key tiles: half the per-iteration overhead of 32
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2,
                        budgets={"dq": 15.0, "dq-prefix": 15.0} if head_dim == 128 else {})
        # dprefix: head_dim is the M operand of two of its dots (BLOCK_D rows); 80/96 pad to 128 and
        # their dim masks cost registers: smaller row tiles
        if head_dim == 128:
            return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=_SM90_BWD_STAGES,
                        budgets={"dprefix": 25.0})
        return dict(BLOCK_M=64, BLOCK_N=16 if wide else 32, num_warps=8 if wide else 4, num_stages=2)
    if kernel is prefix_attention_fwd_kernel:
        return dict(BLOCK_M=128, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=3)
    if kernel is prefix_attention_bwd_dkdv_kernel:  # head_dim 64: 16-row steps, spill-free on Triton 3.6 too
        return dict(BLOCK_M=32 if wide else 16, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=2)
    if kernel is prefix_attention_bwd_dq_kernel:  # mma.sync keeps q and dO in registers: small row tiles
        return dict(BLOCK_M=32 if wide else 64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if wide else 4, num_stages=2)


def _signature(kernel, t: str, tiles: dict, tma: bool) -> dict[str, str]:
    """Argument types; ``*_desc`` arguments are 4-D tensor descriptors with TMA, plain pointers without."""
    types = {}
    params = inspect.signature(kernel.fn).parameters.values()  # JIT and interpreted kernels alike
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_desc"):
            types[name] = f"tensordesc<{t}[1,1,{tiles[DESC_ROWS[kernel]]},{tiles['BLOCK_D']}]>" if tma else f"*{t}"
        elif name == "path_ptr":
            types[name] = "*i64"
        elif name == "cu_ptr":
            types[name] = "*i32"
        elif name == "mask_ptr":
            types[name] = "*u8"
        elif name in ("lse_ptr", "delta_ptr", "dpk_ptr", "dpv_ptr"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = f"*{t}"
        elif name == "sm_scale":
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


# element strides of q/k/v/out/gradients/prefix: multiples of 16 whenever head_dim is (64, 80, 96, 128). At
# run time Triton specialises on the actual values; the ahead-of-time compile assumes this common case.
_NOT_OF_16 = ("stride_lb", "stride_lt", "stride_mb")  # log-sum-exp/delta [.., H] and the mask [B, L]


def _strides_of_16(kernel) -> tuple[str, ...]:
    return tuple(n for n in kernel.arg_names if n.startswith("stride_") and n not in _NOT_OF_16)


def _own_constexprs(kernel, values: dict) -> dict:
    """The subset of ``values`` that ``kernel`` takes (the dprefix kernel has no causal or mask variants)."""
    return {k: v for k, v in values.items() if k in kernel.arg_names}


def _tile_options(kernel, dtype: torch.dtype, head_dim: int, arch: int, tma: bool) -> list[dict]:
    """Every registered tile set of one variant, the default first; on GPUs the autotuner times them all.
    ``tag`` names an alternative in its config's variant."""
    tiles = _tile(kernel, dtype, head_dim, arch, tma)
    if kernel is prefix_attention_bwd_dq_kernel and tma_arch(dtype, arch) and head_dim == 128:
        # 32-key tiles: fewer registers than 64 (aot prints both), more programs' worth of overlap
        return [tiles, dict(tiles, BLOCK_N=32, budgets={"dq": 20.0, "dq-prefix": 20.0}, tag="n32")]
    return [tiles]


def _variants(kernel, dtype: torch.dtype, arch: int) -> tuple[bool, ...]:
    """Which variants ship (True: tensor descriptors, False: pointer loads), the default first: the one
    whose main loops profile lower on sm_90 with this Triton line (``python -m pdfkernels.aot --profile``).
    On a GPU the autotuner times every variant a call's tensors allow. The figures behind this choice are
    in docs/static-profile.md; under Triton before 3.7 the TMA dK/dV is over its budget and not
    shipped."""
    if not tma_arch(dtype, arch):
        return (False,)
    old_triton = _TRITON_LINE < (3, 7)
    if kernel is prefix_attention_bwd_dkdv_kernel and old_triton:
        return (False,)
    if kernel is prefix_attention_bwd_dq_kernel and old_triton:
        return (False, True)
    return (True, False)


def _key(dtype: torch.dtype, head_dim: int, arch: int) -> tuple:
    return (_TL_TYPES[dtype], head_dim, arch)


def _register_configs() -> None:
    """What ships: every kernel for each dtype, head_dim and architecture, compiled as the packed causal
    variant; on sm_90 16-bit also the padded causal variant with tensor descriptors (the layout Hugging
    Face models pass)."""
    for dtype, t in _TL_TYPES.items():
        for head_dim, kernel, arch in itertools.product(HEAD_DIMS, _KERNELS, ARCHS):
            block_d = triton.next_power_of_2(head_dim)
            options = [(tma, tiles) for tma in _variants(kernel, dtype, arch)
                       for tiles in _tile_options(kernel, dtype, head_dim, arch, tma)]
            # the dprefix launcher sizes its partial buffers from the first option's tiles
            assert kernel is not prefix_attention_bwd_dprefix_kernel or len(
                {(t["BLOCK_M"], t["BLOCK_N"]) for _, t in options}) == 1, "dprefix options must share tiles"
            for tma, tiles in options:
                if kernel is prefix_attention_bwd_dkdv_kernel:
                    assert tiles["BLOCK_N"] % tiles["BLOCK_M"] == 0, "the causal diagonal must be whole query tiles"
                label = f"{t} D={head_dim}" + (" tma" if tma else "") + (f" {tiles['tag']}" if "tag" in tiles else "")
                register(KernelConfig(
                    kernel, label, arch=arch, key=_key(dtype, head_dim, arch),
                    signature=_signature(kernel, t, dict(tiles, BLOCK_D=block_d), tma),
                    constexprs=_own_constexprs(kernel, dict(
                        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"],
                        CAUSAL=True, VARLEN=not tma, HAS_MASK=False, UPCAST=False,
                        PRECISION="ieee" if dtype == torch.float32 else "tf32", TMA=tma)),
                    num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
                    expect_wgmma=dtype != torch.float32, multiple_of_16=_strides_of_16(kernel),
                    budgets=tiles.get("budgets", {}) if dtype != torch.float32 else {}))


_register_configs()


def _shipped(head_dim: int) -> int:
    shipped = min((d for d in HEAD_DIMS if d >= head_dim), default=None)
    if shipped is None:
        raise ValueError(f"prefix_attention: head_dim up to {HEAD_DIMS[-1]} is supported, got {head_dim}")
    return shipped


@functools.cache  # per launch on the hot path; the registry is complete at import
def candidates(kernel, dtype: torch.dtype, head_dim: int, arch: int, tma: bool) -> tuple[KernelConfig, ...]:
    """The registered configurations for a launch (nearest registered head_dim at or above), default first;
    ``tma``: whether the call's tensors may take the descriptor variants."""
    configs = registry.lookup(kernel, _key(dtype, _shipped(head_dim), arch))
    return tuple(c for c in configs if tma or not c.constexprs["TMA"])


def specialise(cfg: KernelConfig, head_dim: int, causal: bool, varlen: bool, has_mask: bool) -> dict:
    """A registered configuration's constexprs and launch parameters for one call."""
    return dict(_own_constexprs(cfg.kernel, dict(
        cfg.constexprs, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal,
        VARLEN=varlen, HAS_MASK=has_mask, UPCAST=backend.interpreting())),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
