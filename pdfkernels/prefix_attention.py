"""Prefix-augmented attention over N paths of deep prefixes, padded or packed, forward and backward.

Semantics are those of ``pdfkernels.reference.prefix_attention``. On CUDA (or with
``PDFKERNELS_BACKEND=triton``) one launch covers every sequence of every path: a sequence's path id picks
its prefix, read in place (no concatenation, no ``repeat_kv``, no padded copies); see
``prefix_attention_kernels`` for the layout. The backward follows FlashAttention-2: recompute from the
saved log2-sum-exp2 with ``delta = rowsum(dO * O)``; dK/dV per key block (every query head of a GQA group
in one program), dQ per query block, dprefix per chunk of query rows. ``dprefix_k``/``dprefix_v`` are
**deterministic**: each chunk program accumulates in registers and writes one fp32 partial, and the
partials are summed per sequence and then per path in a fixed order. No atomics remain anywhere.
"""

from __future__ import annotations

import inspect
import itertools

import torch
import triton

from . import backend, reference
from .autocast import follows_autocast
from .baselines import cat_sdpa_prefix_attention
from .prefix_attention_kernels import (
    prefix_attention_bwd_dkdv_kernel,
    prefix_attention_bwd_dprefix_kernel,
    prefix_attention_bwd_dq_kernel,
    prefix_attention_fwd_kernel,
)
from .registry import KernelConfig, configs_for, register
from .validation import check_prefix_attention, check_prefix_attention_varlen

_TL_TYPES = backend.TRITON_TYPES
HEAD_DIMS = (64, 80, 96, 128)
ARCHS = (80, 90)  # tuned for A100-class and H100-class GPUs; newer GPUs use the sm_90 tiles
_KERNELS = (prefix_attention_fwd_kernel, prefix_attention_bwd_dkdv_kernel, prefix_attention_bwd_dq_kernel,
            prefix_attention_bwd_dprefix_kernel)
# pipeline stages of the sm_90 16-bit dK/dV and head_dim-128 dprefix kernels: the most that each Triton
# line compiles without spills (3.6, as on the GPU machines: 1; 3.9: 2)
_SM90_BWD_STAGES = 1 if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7) else 2
DPREFIX_CHUNK_ROWS = 1024  # query rows (tokens x heads) per dprefix program: one fp32 partial per chunk


def _tiles(kernel, dtype: torch.dtype, head_dim: int, arch: int) -> dict:
    """Tile sizes, launch parameters and static-profile budgets per kernel, dtype, head_dim and architecture:
    the one source for launches and for ``python -m pdfkernels.aot`` (each compiles there without spills
    with Triton 3.6, as on the GPU machines, and 3.9). The sm_90 16-bit dK/dV and head_dim-128 dprefix
    kernels are pipelined per Triton version: 3.6 spills with two stages (8/24 bytes outside the inner
    loops), 3.9 with one (64-80 bytes). ``budgets``: the most issue clocks
    per 64x64x16 MMA unit that ``python -m pdfkernels.aot --profile`` accepts for the named loop (``# loop:``
    in the kernels) on sm_90; measured figures plus a small margin. Untuned on a GPU so far.

    BLOCK_M counts query rows, BLOCK_N keys (own or prefix). dK/dV: BLOCK_N keys are the MMA's M operand
    (>= 64 per warpgroup on sm_90) and a multiple of BLOCK_M (the causal diagonal is whole query tiles)."""
    wide = head_dim > 64
    if dtype == torch.float32:  # full-precision (ieee) dots run on CUDA cores: small tiles, no spills
        if kernel is prefix_attention_bwd_dkdv_kernel:  # sm_90, 8 warps: Triton 3.6 spills 8 bytes
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
        if kernel is prefix_attention_bwd_dq_kernel:
            return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2,
                        budgets={"dq": 25.0, "dq-prefix": 25.0} if head_dim == 128 else {})
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


def _signature(kernel, t: str) -> dict[str, str]:
    types = {}
    params = inspect.signature(kernel.fn).parameters.values()  # JIT and interpreted kernels alike
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
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


def _register_configs() -> None:
    """What ships: every kernel for each dtype and head_dim, compiled as the packed causal variant."""
    for dtype, t in _TL_TYPES.items():
        for head_dim, kernel, arch in itertools.product(HEAD_DIMS, _KERNELS, ARCHS):
            tiles = _tiles(kernel, dtype, head_dim, arch)
            if kernel is prefix_attention_bwd_dkdv_kernel:
                assert tiles["BLOCK_N"] % tiles["BLOCK_M"] == 0, "the causal diagonal must be whole query tiles"
            register(KernelConfig(
                kernel, f"{t} D={head_dim}", arch=arch, signature=_signature(kernel, t),
                constexprs=_own_constexprs(kernel, dict(
                    HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=tiles["BLOCK_M"],
                    BLOCK_N=tiles["BLOCK_N"], CAUSAL=True, VARLEN=True, HAS_MASK=False, UPCAST=False,
                    PRECISION="ieee" if dtype == torch.float32 else "tf32")),
                num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
                expect_wgmma=dtype != torch.float32, multiple_of_16=_strides_of_16(kernel),
                budgets=tiles.get("budgets", {}) if dtype != torch.float32 else {}))


_register_configs()


def _arch(device: torch.device) -> int:
    """Which tuned tiles a device gets: sm_90 tiles for Hopper and newer (and under the interpreter)."""
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _launch_params(kernel, dtype: torch.dtype, head_dim: int, causal: bool, varlen: bool, has_mask: bool,
                   arch: int) -> dict:
    """The registered configuration of this kernel (nearest registered head_dim at or above), specialised."""
    shipped = min((d for d in HEAD_DIMS if d >= head_dim), default=None)
    if shipped is None:
        raise ValueError(f"prefix_attention: head_dim up to {HEAD_DIMS[-1]} is supported, got {head_dim}")
    (cfg,) = [c for c in configs_for(kernel) if c.variant == f"{_TL_TYPES[dtype]} D={shipped}" and c.arch == arch]
    return dict(_own_constexprs(kernel, dict(
        cfg.constexprs, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal,
        VARLEN=varlen, HAS_MASK=has_mask, UPCAST=backend.interpreting())),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any sequence/token/head strides (0 included: expanded inputs are read in place) but
    address head_dim as unit-stride columns; anything else is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _Layout:
    """Strides and sizes of one call in the kernels' terms: sequence (batch) stride, token stride, head stride."""

    def __init__(self, q, k, cu_seqlens, mask, varlen: bool):
        self.varlen = varlen
        if varlen:
            self.num_seqs = cu_seqlens.shape[0] - 1
            self.q_strides = lambda t: (0, t.stride(0), t.stride(1))
            self.lse_shape = (q.shape[0], q.shape[1])  # [T, H]
        else:
            self.num_seqs = q.shape[0]
            self.q_strides = lambda t: (t.stride(0), t.stride(2), t.stride(1))
            self.lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # [B, L, H]
        # read as a plain array: a strided view is copied (S+1 ints)
        self.cu = cu_seqlens.contiguous() if varlen else q.new_zeros(1, dtype=torch.int32)  # unread when padded
        self.mask = mask

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))


def _forward(q, k, v, pk, pv, path_ids, layout: _Layout, max_len: int, causal: bool, scale: float):
    heads, hkv = q.shape[-2] if layout.varlen else q.shape[1], pk.shape[1]
    head_dim = q.shape[-1]
    out = backend.new_output(q)
    lse = torch.empty(layout.lse_shape, dtype=torch.float32, device=q.device)
    params = _launch_params(prefix_attention_fwd_kernel, q.dtype, head_dim, causal, layout.varlen,
                            layout.mask is not None, _arch(q.device))
    group = heads // hkv
    grid = (triton.cdiv(max_len * group, params["BLOCK_M"]), layout.num_seqs, hkv)
    mask = layout.mask if layout.mask is not None else path_ids
    prefix_attention_fwd_kernel[grid](
        q, k, v, pk, pv, path_ids, layout.cu, mask, out, lse, max_len, group, pk.shape[2], scale,
        *layout.q_strides(q), *layout.q_strides(k), *layout.q_strides(v), pk.stride(0), pk.stride(1), pk.stride(2),
        *layout.q_strides(out), *layout.lse_strides(lse), layout.mask.stride(0) if layout.mask is not None else 0,
        **params)
    return out, lse


def _backward(do, q, k, v, pk, pv, path_ids, out, lse, layout: _Layout, max_len: int, causal: bool, scale: float,
              num_paths: int):
    heads, hkv = q.shape[-2] if layout.varlen else q.shape[1], pk.shape[1]
    head_dim, num_prefix = q.shape[-1], pk.shape[2]
    group = heads // hkv
    delta = (do.float() * out.float()).sum(-1)  # [T, H] or [B, H, L]
    delta = delta if layout.varlen else delta.transpose(1, 2)
    delta = delta.contiguous()
    # fresh buffers: q's/k's/v's strides when those are dense, contiguous otherwise (expanded or sliced
    # inputs); the kernels are told each buffer's own strides
    dq, dk, dv = backend.new_output(q), backend.new_output(k), backend.new_output(v)
    mask = layout.mask if layout.mask is not None else path_ids
    mask_stride = layout.mask.stride(0) if layout.mask is not None else 0
    has_mask = layout.mask is not None

    arch = _arch(q.device)
    p = _launch_params(prefix_attention_bwd_dkdv_kernel, q.dtype, head_dim, causal, layout.varlen, has_mask, arch)
    grid = (triton.cdiv(max_len, p["BLOCK_N"]), layout.num_seqs, hkv)
    prefix_attention_bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, layout.cu, mask, dk, dv, max_len, group, scale,
        *layout.q_strides(q), *layout.q_strides(k), *layout.q_strides(v), *layout.q_strides(do),
        *layout.q_strides(dk), *layout.q_strides(dv), *layout.lse_strides(lse), mask_stride, **p)

    p = _launch_params(prefix_attention_bwd_dq_kernel, q.dtype, head_dim, causal, layout.varlen, has_mask, arch)
    prefix_attention_bwd_dq_kernel[(triton.cdiv(max_len * group, p["BLOCK_M"]), layout.num_seqs, hkv)](
        q, k, v, pk, pv, path_ids, do, lse, delta, layout.cu, mask, dq, max_len, group, num_prefix, scale,
        *layout.q_strides(q), *layout.q_strides(k), *layout.q_strides(v), pk.stride(0), pk.stride(1), pk.stride(2),
        *layout.q_strides(do), *layout.q_strides(dq), *layout.lse_strides(lse), mask_stride, **p)
    if num_prefix == 0:
        return dq, dk, dv, torch.zeros_like(pk), torch.zeros_like(pv)

    # dprefix: one fp32 partial per (sequence, KV head, chunk of query rows), summed per sequence in chunk
    # order, then per path with a masked sum (not a matmul, so that no TF32 setting can round it): deterministic
    p = _launch_params(prefix_attention_bwd_dprefix_kernel, q.dtype, head_dim, causal, layout.varlen, has_mask,
                       arch)
    chunk = triton.cdiv(triton.cdiv(DPREFIX_CHUNK_ROWS, group), p["BLOCK_M"]) * p["BLOCK_M"]  # tokens
    chunks = triton.cdiv(max_len, chunk)
    key_blocks = triton.cdiv(num_prefix, p["BLOCK_N"])
    k_pad = key_blocks * p["BLOCK_N"]
    dpk_part = backend.new_output(q, (layout.num_seqs, hkv, chunks, k_pad, p["BLOCK_D"]), torch.float32)
    dpv_part = backend.new_output(q, (layout.num_seqs, hkv, chunks, k_pad, p["BLOCK_D"]), torch.float32)
    prefix_attention_bwd_dprefix_kernel[(chunks, layout.num_seqs, hkv * key_blocks)](
        q, pk, pv, path_ids, do, lse, delta, layout.cu, dpk_part, dpv_part, max_len, group, num_prefix, chunk, scale,
        *layout.q_strides(q), pk.stride(0), pk.stride(1), pk.stride(2), *layout.q_strides(do),
        *layout.lse_strides(lse), **p)
    one_hot = torch.nn.functional.one_hot(path_ids, num_paths).T.float()[:, :, None]  # [N, S, 1]
    per_path = []
    for part in (dpk_part, dpv_part):
        per_seq = part[:, :, :, :num_prefix, :head_dim].sum(2).flatten(1)  # [S, Hkv * K * D]
        summed = (one_hot * per_seq[None]).sum(1).view(num_paths, hkv, num_prefix, head_dim)
        per_path.append(summed.to(pk.dtype))
    dpk, dpv = per_path
    return dq, dk, dv, dpk, dpv


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, path_ids, cu_seqlens, mask, max_len: int, causal: bool, scale: float,
                varlen: bool):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        pk, pv = pk.contiguous(), pv.contiguous()
        path_ids = path_ids.to(torch.int64).contiguous()
        mask = mask.contiguous().view(torch.uint8) if mask is not None else None
        layout = _Layout(q, k, cu_seqlens, mask, varlen)
        out, lse = _forward(q, k, v, pk, pv, path_ids, layout, max_len, causal, scale)
        ctx.save_for_backward(q, k, v, pk, pv, path_ids, out, lse)
        ctx.layout, ctx.max_len, ctx.causal, ctx.scale = layout, max_len, causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, pk, pv, path_ids, out, lse = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        with torch.no_grad():
            grads = _backward(do, q, k, v, pk, pv, path_ids, out, lse, ctx.layout, ctx.max_len, ctx.causal,
                              ctx.scale, pk.shape[0])
        if torch.is_grad_enabled():  # create_graph=True: the gradients are first-order only, say so if used
            grads = _FirstOrderOnly.apply(len(grads), *grads, do, q, k, v, pk, pv)
        return (*grads, None, None, None, None, None, None, None)


class _FirstOrderOnly(torch.autograd.Function):
    """Marks the Triton backward's gradients: differentiating them again (a gradient penalty, Hessian-vector
    products) raises instead of silently treating them as constants."""

    @staticmethod
    def forward(ctx, num_grads: int, *tensors):
        # the inputs after the gradients only tie the outputs to the graph (they require grad)
        return tuple(g.clone() for g in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            "prefix_attention: the Triton kernels give first-order gradients only; differentiating their "
            "gradients again (create_graph=True, double backward) is not supported. For higher-order gradients "
            "call pdfkernels.reference.prefix_attention / prefix_attention_varlen (plain PyTorch).")


def _torch_path(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal: bool, scale: float):
    """The PyTorch path (CPU default): SDPA on the concatenated keys with an explicit mask, computed in fp32
    for 16-bit inputs as the reference is; plain causal SDPA when there is neither prefix nor padding."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v, prefix_k, prefix_v = (t.float() for t in (q, k, v, prefix_k, prefix_v))
    if prefix_k.shape[2] == 0 and key_padding_mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                               enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = cat_sdpa_prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal, scale)
    return out.to(dtype)


@follows_autocast
def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, path_ids: torch.Tensor, *,
                     key_padding_mask: torch.Tensor | None = None, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Attention over ``[prefix of path_ids[b]; own keys]`` for padded rows. Shapes: q ``[B, H, L, D]``,
    k, v ``[B, Hkv, L, D]``, prefix_k, prefix_v ``[N, Hkv, K, D]``, path_ids ``[B]``, key_padding_mask
    ``[B, L]`` bool (True = real token, left or right padding). Returns q's shape and dtype; when q is the
    ``[B, H, L, D]`` transpose of a ``[B, L, H, D]`` buffer (as Hugging Face passes it), so is the output,
    and transposing it back is free. Differentiable in q, k, v, prefix_k and prefix_v."""
    return _prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal, softmax_scale, True)


@follows_autocast
def prefix_attention_known_paths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                                 prefix_v: torch.Tensor, path_ids: torch.Tensor, *,
                                 key_padding_mask: torch.Tensor | None = None, causal: bool = True,
                                 softmax_scale: float | None = None) -> torch.Tensor:
    """``prefix_attention`` for callers that built ``path_ids`` from already validated paths (the model
    wrappers, once per layer): every check but the path-id range, which would cost a device sync."""
    return _prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal, softmax_scale, False)


def _prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal, softmax_scale,
                      check_path_range: bool) -> torch.Tensor:
    scale = check_prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal,
                                   softmax_scale, check_path_range)
    if not backend.use_triton_for("prefix_attention", q):
        return _torch_path(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal, scale)
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, path_ids, None, key_padding_mask, q.shape[2],
                                  causal, scale, False)


@follows_autocast
def prefix_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                            path_ids: torch.Tensor, *, causal: bool = True,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """Packed sequences: q ``[T, H, D]``, k, v ``[T, Hkv, D]``, cu_seqlens int32 ``[S+1]``, path_ids ``[S]``.
    Returns ``[T, H, D]`` in q's dtype. Differentiable in q, k, v, prefix_k and prefix_v."""
    scale = check_prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids,
                                          causal, softmax_scale)
    if not backend.use_triton_for("prefix_attention_varlen", q):
        return reference.prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids,
                                                 causal=causal, softmax_scale=scale)
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, path_ids, cu_seqlens, None, max(max_seqlen, 1),
                                  causal, scale, True)
