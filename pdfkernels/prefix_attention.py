"""Prefix-augmented attention over N paths of deep prefixes, padded or packed, forward and backward.

Semantics are those of ``pdfkernels.reference.prefix_attention``. On CUDA (or with
``PDFKERNELS_BACKEND=triton``) one launch covers every sequence of every path: a sequence's path id picks
its prefix, read in place (no concatenation, no ``repeat_kv``, no padded copies); see
``prefix_attention_kernels`` for the strides. The backward follows FlashAttention-2: recompute from the
saved log2-sum-exp2 with ``delta = rowsum(dO * O)``; dK/dV per key block (every query head of a GQA group
in one program), dQ per query block, dprefix per chunk of query rows. ``dprefix_k``/``dprefix_v`` are
**deterministic**: each chunk program accumulates in registers and writes one fp32 partial, and the
partials are summed per sequence and then per path in a fixed order. No atomics remain anywhere.
"""

from __future__ import annotations

import torch
import triton

from . import autotune, backend
from . import prefix_attention_tiles as tiles
from . import prefix_attention_tma as tma_policy
from . import prefix_attention_torch as torch_path
from .autocast import follows_autocast
from .prefix_attention_kernels import (
    prefix_attention_bwd_dkdv_kernel,
    prefix_attention_bwd_dprefix_kernel,
    prefix_attention_bwd_dq_kernel,
    prefix_attention_fwd_kernel,
)
from .validation import check_prefix_attention, check_prefix_attention_varlen

DPREFIX_CHUNK_ROWS = 1024  # query rows (tokens x heads) per dprefix program: one fp32 partial per chunk


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any sequence/token/head strides (0 included: expanded inputs are read in place) but
    address head_dim as unit-stride columns; anything else is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _Strides:
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


class _Call:
    """What the launches of one forward or backward share, and the one way each kernel is launched."""

    def __init__(self, q, strides: _Strides, max_len: int, group: int, num_prefix: int, causal: bool):
        self.q, self.strides, self.max_len, self.group, self.num_prefix, self.causal = (
            q, strides, max_len, group, num_prefix, causal)
        self.arch = tma_policy.arch_of(q.device)

    def options(self, kernel, streamed: tuple) -> tuple[bool, tuple]:
        """Whether ``kernel`` takes tensor descriptors for ``streamed`` here, and its candidate configurations."""
        tma = tma_policy.use_tma(self.q.device, self.q.dtype, self.strides.varlen, streamed)
        return tma, tiles.candidates(kernel, self.q.dtype, self.q.shape[-1], self.arch, tma)

    def tune_key(self, tma: bool) -> tuple:
        """What can change the fastest configuration of a launch: flags and a shape bucket."""
        q, strides = self.q, self.strides
        work = strides.num_seqs * (q.shape[-2] if strides.varlen else q.shape[1]) // self.group  # (seq, KV head)
        return (q.dtype, q.shape[-1], self.group, self.causal, strides.varlen, strides.mask is not None, tma,
                triton.next_power_of_2(self.max_len), triton.next_power_of_2(work), self.num_prefix > 0)

    def specialise(self, cfg) -> dict:
        return tiles.specialise(cfg, self.q.shape[-1], self.causal, self.strides.varlen, self.strides.mask is not None)

    def launch(self, kernel, streamed: tuple, grid, args, options: tuple | None = None) -> dict:
        """Launch ``kernel`` with the fastest of its candidates (timed on first use on GPUs, the default
        elsewhere): ``grid(params)`` gives the grid, ``args(params, descriptors)`` the positional arguments, the
        ``*_desc`` ones last (``streamed`` described, or the tensors themselves without TMA)."""
        tma, configs = options or self.options(kernel, streamed)

        def run(cfg) -> dict:
            params = self.specialise(cfg)
            kernel[grid(params)](*args(params, tma_policy.descriptors(kernel, params, streamed)), **params)
            return params

        chosen = autotune.pick(kernel.fn.__name__, self.tune_key(tma), configs, run, self.q.device)
        return run(chosen)  # the last timed run may have been another candidate


def _forward(q, k, v, pk, pv, path_ids, strides: _Strides, max_len: int, causal: bool, scale: float):
    heads, hkv = q.shape[-2] if strides.varlen else q.shape[1], pk.shape[1]
    num_prefix = pk.shape[2]
    out = backend.new_output(q)
    lse = torch.empty(strides.lse_shape, dtype=torch.float32, device=q.device)
    group = heads // hkv
    mask = strides.mask if strides.mask is not None else path_ids
    call = _Call(q, strides, max_len, group, num_prefix, causal)

    def args(p: dict, descs: tuple) -> tuple:
        return (q, k, v, pk, pv, path_ids, strides.cu, mask, out, lse, *descs,
                max_len, group, num_prefix, scale, *strides.q_strides(q), *strides.q_strides(k), *strides.q_strides(v),
                pk.stride(0), pk.stride(1), pk.stride(2), *strides.q_strides(out), *strides.lse_strides(lse),
                strides.mask.stride(0) if strides.mask is not None else 0)

    # an empty prefix is never read: k and v stand in for its descriptors
    call.launch(prefix_attention_fwd_kernel, (k, v, pk, pv) if num_prefix else (k, v, k, v),
                lambda p: (triton.cdiv(max_len * group, p["BLOCK_M"]), strides.num_seqs, hkv), args)
    return out, lse


def _backward(do, q, k, v, pk, pv, path_ids, out, lse, strides: _Strides, max_len: int, causal: bool, scale: float,
              num_paths: int):
    heads, hkv = q.shape[-2] if strides.varlen else q.shape[1], pk.shape[1]
    head_dim, num_prefix = q.shape[-1], pk.shape[2]
    group = heads // hkv
    delta = (do.float() * out.float()).sum(-1)  # [T, H] or [B, H, L]
    delta = delta if strides.varlen else delta.transpose(1, 2)
    delta = delta.contiguous()
    # fresh buffers: q's/k's/v's strides when those are dense, contiguous otherwise (expanded or sliced
    # inputs); the kernels are told each buffer's own strides
    dq, dk, dv = backend.new_output(q), backend.new_output(k), backend.new_output(v)
    mask = strides.mask if strides.mask is not None else path_ids
    mask_stride = strides.mask.stride(0) if strides.mask is not None else 0
    call = _Call(q, strides, max_len, group, num_prefix, causal)

    def dkdv_args(p: dict, descs: tuple) -> tuple:
        return (q, k, v, do, lse, delta, strides.cu, mask, dk, dv, *descs,
                max_len, group, scale, *strides.q_strides(q), *strides.q_strides(k), *strides.q_strides(v),
                *strides.q_strides(do), *strides.q_strides(dk), *strides.q_strides(dv), *strides.lse_strides(lse),
                mask_stride)

    call.launch(prefix_attention_bwd_dkdv_kernel, (q, do),
                lambda p: (triton.cdiv(max_len, p["BLOCK_N"]), strides.num_seqs, hkv), dkdv_args)

    def dq_args(p: dict, descs: tuple) -> tuple:
        return (q, k, v, pk, pv, path_ids, do, lse, delta, strides.cu, mask, dq,
                *descs, max_len, group, num_prefix, scale,
                *strides.q_strides(q), *strides.q_strides(k), *strides.q_strides(v), pk.stride(0), pk.stride(1),
                pk.stride(2), *strides.q_strides(do), *strides.q_strides(dq), *strides.lse_strides(lse), mask_stride)

    call.launch(prefix_attention_bwd_dq_kernel, (k, v, pk, pv) if num_prefix else (k, v, k, v),  # see the forward
                lambda p: (triton.cdiv(max_len * group, p["BLOCK_M"]), strides.num_seqs, hkv), dq_args)
    if num_prefix == 0:
        return dq, dk, dv, torch.zeros_like(pk), torch.zeros_like(pv)

    # dprefix: one fp32 partial per (sequence, KV head, chunk of query rows), summed per sequence in chunk
    # order, then per path with a masked sum (not a matmul, so that no TF32 setting can round it): deterministic
    kernel, streamed = prefix_attention_bwd_dprefix_kernel, (q, do)
    options = call.options(kernel, streamed)
    p = call.specialise(options[1][0])  # every option has its tiles
    chunk = triton.cdiv(triton.cdiv(DPREFIX_CHUNK_ROWS, group), p["BLOCK_M"]) * p["BLOCK_M"]  # tokens
    chunks = triton.cdiv(max_len, chunk)
    key_blocks = triton.cdiv(num_prefix, p["BLOCK_N"])
    k_pad = key_blocks * p["BLOCK_N"]
    dpk_part = backend.new_output(q, (strides.num_seqs, hkv, chunks, k_pad, p["BLOCK_D"]), torch.float32)
    dpv_part = backend.new_output(q, (strides.num_seqs, hkv, chunks, k_pad, p["BLOCK_D"]), torch.float32)

    def dprefix_args(p: dict, descs: tuple) -> tuple:
        return (q, pk, pv, path_ids, do, lse, delta, strides.cu, dpk_part, dpv_part,
                *descs, max_len, group, num_prefix, chunk, scale,
                *strides.q_strides(q), pk.stride(0), pk.stride(1), pk.stride(2), *strides.q_strides(do),
                *strides.lse_strides(lse))

    call.launch(kernel, streamed, lambda p: (chunks, strides.num_seqs, hkv * key_blocks), dprefix_args, options)
    # a select, not a product with a one-hot: 0 * NaN is NaN, and one path's NaN must not reach another path;
    # a comparison, not one_hot, which reads the ids on the host (a sync, no CUDA-graph capture)
    of_path = (torch.arange(num_paths, device=path_ids.device)[:, None] == path_ids[None, :])[:, :, None]  # [N, S, 1]
    per_path = []
    for part in (dpk_part, dpv_part):
        per_seq = part[:, :, :, :num_prefix, :head_dim].sum(2).flatten(1)  # [S, Hkv * K * D]
        summed = torch.where(of_path, per_seq[None], 0.0).sum(1).view(num_paths, hkv, num_prefix, head_dim)
        per_path.append(summed.to(pk.dtype))
    dpk, dpv = per_path
    return dq, dk, dv, dpk, dpv


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




# ---------------------------------------------------------------------------------------------------
# Registered ops (torch.library): what torch.compile traces and CUDA graphs capture
# ---------------------------------------------------------------------------------------------------
# custom_op, not triton_op: the launchers choose among registered configurations (autotune, TMA descriptors
# built on the host) per call, which triton_op's traced body cannot hold; to the compiler each op is one opaque
# node with a fake implementation. Values are never read on the host inside an op (no sync, capturable).

def _like(t: torch.Tensor) -> torch.Tensor:
    """The buffer an op returns for ``t``'s gradient or output: ``t``'s strides when its head_dim is unit-stride
    and it is dense, else contiguous (the same rule in the real and the fake implementation)."""
    return torch.empty_like(_last_dim_contiguous(t))


def _fake_forward(q, varlen: bool):
    backend.use_triton_for("prefix_attention", q)  # refuses a dtype the kernels do not take, as the real op does
    # both backends: log-sum-exp [T, H] packed, [B, L, H] padded, fp32 (fp64 for the fp64 inputs only the
    # PyTorch path takes)
    lse_shape = (q.shape[0], q.shape[1]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    return _like(q), q.new_empty(lse_shape, dtype=backend.accumulate_dtype(q))


def _fake_backward(q, k, v, prefix_k, prefix_v):
    return (_like(q), _like(k), _like(v), prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))


def _triton_forward(q, k, v, pk, pv, path_ids, cu_seqlens, mask, max_len: int, causal: bool, scale: float,
                    varlen: bool):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    pk, pv = pk.contiguous(), pv.contiguous()
    path_ids = path_ids.to(torch.int64).contiguous()
    mask = mask.contiguous().view(torch.uint8) if mask is not None else None
    return _forward(q, k, v, pk, pv, path_ids, _Strides(q, k, cu_seqlens, mask, varlen), max_len, causal, scale)


def _triton_backward(do, q, k, v, pk, pv, path_ids, cu_seqlens, mask, out, lse, max_len: int, causal: bool,
                     scale: float, varlen: bool):
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    pk, pv = pk.contiguous(), pv.contiguous()
    path_ids = path_ids.to(torch.int64).contiguous()
    mask = mask.contiguous().view(torch.uint8) if mask is not None else None
    return _backward(do, q, k, v, pk, pv, path_ids, out, lse, _Strides(q, k, cu_seqlens, mask, varlen), max_len,
                     causal, scale, pk.shape[0])


def _differentiable_grads(run, do, inputs):
    """create_graph=True on the PyTorch path: its gradients as a graph, by autograd over the same formulas."""
    with torch.enable_grad():
        return torch.autograd.grad(run(*inputs)[0], inputs, do, create_graph=True, allow_unused=True)


def _fixed(buffers, grads):
    """Each result in the buffer its fake implementation promises (fixed strides)."""
    for buffer, grad in zip(buffers, grads):
        buffer.copy_(grad)
    return tuple(buffers)


@torch.library.custom_op("pdfkernels::prefix_attention", mutates_args=())
def _prefix_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                         prefix_v: torch.Tensor, path_ids: torch.Tensor, key_padding_mask: torch.Tensor | None,
                         causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if backend.use_triton_for("prefix_attention", q):
        return _triton_forward(q, k, v, prefix_k, prefix_v, path_ids, None, key_padding_mask, q.shape[2], causal,
                               scale, False)
    out, lse = torch_path.forward(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal, scale)
    return _fixed([_like(q)], [out])[0], lse


@_prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal, scale):
    return _fake_forward(q, False)


@torch.library.custom_op("pdfkernels::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  prefix_k: torch.Tensor, prefix_v: torch.Tensor, path_ids: torch.Tensor,
                                  key_padding_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                                  causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    if backend.use_triton_for("prefix_attention", q):
        return _triton_backward(do, q, k, v, prefix_k, prefix_v, path_ids, None, key_padding_mask, out, lse,
                                q.shape[2], causal, scale, False)
    grads = torch_path.backward(do, q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, out, lse, causal, scale)
    return _fixed(_fake_backward(q, k, v, prefix_k, prefix_v), grads)


@_prefix_attention_backward_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, out, lse, causal, scale):
    return _fake_backward(q, k, v, prefix_k, prefix_v)


@torch.library.custom_op("pdfkernels::prefix_attention_varlen", mutates_args=())
def _prefix_attention_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                                prefix_v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                path_ids: torch.Tensor, causal: bool,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if backend.use_triton_for("prefix_attention_varlen", q):
        return _triton_forward(q, k, v, prefix_k, prefix_v, path_ids, cu_seqlens, None, max(max_seqlen, 1), causal,
                               scale, True)
    out, lse = torch_path.forward_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, path_ids, causal, scale)
    return _fixed([_like(q)], [out])[0], lse


@_prefix_attention_varlen_op.register_fake
def _(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids, causal, scale):
    return _fake_forward(q, True)


@torch.library.custom_op("pdfkernels::prefix_attention_varlen_backward", mutates_args=())
def _prefix_attention_varlen_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                         prefix_k: torch.Tensor, prefix_v: torch.Tensor, cu_seqlens: torch.Tensor,
                                         max_seqlen: int, path_ids: torch.Tensor, out: torch.Tensor,
                                         lse: torch.Tensor, causal: bool,
                                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor, torch.Tensor]:
    if backend.use_triton_for("prefix_attention_varlen", q):
        return _triton_backward(do, q, k, v, prefix_k, prefix_v, path_ids, cu_seqlens, None, out, lse,
                                max(max_seqlen, 1), causal, scale, True)
    grads = torch_path.backward_varlen(do, q, k, v, prefix_k, prefix_v, cu_seqlens, path_ids, out, lse, causal,
                                       scale)
    return _fixed(_fake_backward(q, k, v, prefix_k, prefix_v), grads)


@_prefix_attention_varlen_backward_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids, out, lse, causal, scale):
    return _fake_backward(q, k, v, prefix_k, prefix_v)


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs  # tensors go through save_for_backward; the rest (flags, ints) stays as given
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    ctx.tensor_at = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    ctx.save_for_backward(*tensors, *output)
    ctx.set_materialize_grads(True)


def _saved(ctx):
    *tensors, out, lse = ctx.saved_tensors
    inputs = list(ctx.inputs)
    for i, t in zip(ctx.tensor_at, tensors):
        inputs[i] = t
    return inputs, out, lse


def _backward_padded(ctx, do, _dlse):
    (q, k, v, pk, pv, path_ids, mask, causal, scale), out, lse = _saved(ctx)
    if torch.is_grad_enabled() and not backend.use_triton_for("prefix_attention", q):  # create_graph=True
        grads = _differentiable_grads(lambda *t: torch_path.forward(*t, path_ids, mask, causal, scale, True), do,
                                      [q, k, v, pk, pv])
    else:
        grads = torch.ops.pdfkernels.prefix_attention_backward(do, q, k, v, pk, pv, path_ids, mask, out, lse, causal,
                                                               scale)
        if torch.is_grad_enabled():  # create_graph=True: the gradients are first-order only, say so if used
            grads = _FirstOrderOnly.apply(len(grads), *grads, do, q, k, v, pk, pv)
    return (*grads, None, None, None, None)


def _backward_varlen(ctx, do, _dlse):
    (q, k, v, pk, pv, cu, max_seqlen, path_ids, causal, scale), out, lse = _saved(ctx)
    if torch.is_grad_enabled() and not backend.use_triton_for("prefix_attention_varlen", q):
        grads = _differentiable_grads(lambda *t: torch_path.forward_varlen(*t, cu, path_ids, causal, scale, True),
                                      do,
                                      [q, k, v, pk, pv])
    else:
        grads = torch.ops.pdfkernels.prefix_attention_varlen_backward(do, q, k, v, pk, pv, cu, max_seqlen, path_ids,
                                                                      out, lse, causal, scale)
        if torch.is_grad_enabled():
            grads = _FirstOrderOnly.apply(len(grads), *grads, do, q, k, v, pk, pv)
    return (*grads, None, None, None, None, None)


_prefix_attention_op.register_autograd(_backward_padded, setup_context=_setup_context)
_prefix_attention_varlen_op.register_autograd(_backward_varlen, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions: argument checks (value checks outside any traced graph), then the op
# ---------------------------------------------------------------------------------------------------

@follows_autocast
def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, path_ids: torch.Tensor, *,
                     key_padding_mask: torch.Tensor | None = None, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Attention over ``[prefix of path_ids[b]; own keys]`` for padded rows. Shapes: q ``[B, H, L, D]``,
    k, v ``[B, Hkv, L, D]``, prefix_k, prefix_v ``[N, Hkv, K, D]``, path_ids ``[B]``, key_padding_mask
    ``[B, L]`` bool (True = real token, left or right padding). Returns q's shape and dtype; when q is the
    ``[B, H, L, D]`` transpose of a ``[B, L, H, D]`` buffer (as Hugging Face passes it), so is the output,
    and transposing it back is free. Differentiable in q, k, v, prefix_k and prefix_v. The op underneath is
    ``torch.ops.pdfkernels.prefix_attention`` (what ``torch.compile`` traces)."""
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
    backend.use_triton_for("prefix_attention", q)  # a dtype the kernels do not take is refused here, by name
    out, _ = torch.ops.pdfkernels.prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal,
                                                   scale)
    return out


@follows_autocast
def prefix_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                            path_ids: torch.Tensor, *, causal: bool = True,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """Packed sequences: q ``[T, H, D]``, k, v ``[T, Hkv, D]``, cu_seqlens int32 ``[S+1]``, path_ids ``[S]``.
    Returns ``[T, H, D]`` in q's dtype. Differentiable in q, k, v, prefix_k and prefix_v. The op underneath is
    ``torch.ops.pdfkernels.prefix_attention_varlen``."""
    scale = check_prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids,
                                          causal, softmax_scale)
    backend.use_triton_for("prefix_attention_varlen", q)
    out, _ = torch.ops.pdfkernels.prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen,
                                                          path_ids, causal, scale)
    return out
