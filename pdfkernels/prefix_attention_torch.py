"""The PyTorch path of prefix attention (CPU default), forward and backward, in fp32 (fp64 for fp64 inputs).

It runs inside a registered op, below autograd, so the backward is explicit: on CPU tensors ATen's fused CPU
attention (``_scaled_dot_product_flash_attention_for_cpu`` and its backward, what SDPA runs on a CPU) on the
concatenated keys with an additive mask; elsewhere (``PDFKERNELS_BACKEND=torch`` on a GPU) the math written
out. Same semantics as ``reference.prefix_attention``: every query sees its row's path prefix and its own
visible keys in one softmax; a query row that sees no key gives zeros."""

from __future__ import annotations

import math

import torch

from . import backend

LOG2E = math.log2(math.e)  # the kernels keep the log-sum-exp in base 2 (they use EX2)

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _fused(q: torch.Tensor) -> bool:
    return _FUSED is not None and _FUSED_BACKWARD is not None and q.device.type == "cpu"


def _bias(q, num_prefix: int, mask, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B or 1, 1, L, K + L]`` mask: 0 where visible, -inf elsewhere (prefix always visible)."""
    visible = _visible(q, num_prefix, mask, causal)
    return torch.zeros(visible.shape, dtype=dtype, device=q.device).masked_fill(~visible, float("-inf"))


def _keys(q, k, v, pk, pv, path_ids):
    """Prefix then own keys and values, repeated over each GQA group: ``[B, H, K + L, D]`` in fp32."""
    acc, group = backend.accumulate_dtype(q), q.shape[1] // k.shape[1]
    keys = torch.cat([pk[path_ids], k], dim=2).to(acc).repeat_interleave(group, dim=1)
    values = torch.cat([pv[path_ids], v], dim=2).to(acc).repeat_interleave(group, dim=1)
    return keys, values


def _visible(q, num_prefix: int, mask, causal: bool) -> torch.Tensor:
    """``[B or 1, 1, L, K + L]`` bool: query i sees every prefix key and its own keys j <= i (causal)."""
    length = q.shape[2]
    visible = torch.ones(length, num_prefix + length, dtype=torch.bool, device=q.device)
    visible = visible.tril(num_prefix)[None, None] if causal else visible[None, None]
    if mask is not None:
        prefix = torch.ones(mask.shape[0], num_prefix, dtype=torch.bool, device=q.device)
        visible = visible & torch.cat([prefix, mask], dim=1)[:, None, None, :]
    return visible


def _probabilities(q, keys, visible, scale: float, lse: torch.Tensor | None = None):
    scores = (q.to(keys.dtype) @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # a row seeing no key: zeros
    return torch.where(visible, torch.exp(scores - safe[..., None]), torch.zeros_like(scores)), lse


def forward(q, k, v, pk, pv, path_ids, mask, causal: bool, scale: float,
            differentiable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (q's dtype) and the log-sum-exp of each query's scores as the Triton kernels store it
    (``_as_kernel_lse``; fp32, fp64 for fp64), so that either backend's forward pairs with either backward.
    ``differentiable``: the math written out, which autograd differentiates twice (the fused kernel's backward
    has no derivative): for second-order gradients."""
    keys, values = _keys(q, k, v, pk, pv, path_ids)
    if _fused(q) and not differentiable:
        bias = _bias(q, pk.shape[2], mask, causal, keys.dtype)
        out, lse = _FUSED(q.to(keys.dtype), keys, values, 0.0, False, attn_mask=bias, scale=scale)
        return out.to(q.dtype), _as_kernel_lse(lse)
    p, lse = _probabilities(q, keys, _visible(q, pk.shape[2], mask, causal), scale)
    return (p @ values).to(q.dtype), _as_kernel_lse(lse)


def _as_kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` natural log-sum-exp (-inf where a query sees no key) -> the kernels' ``[B, L, H]`` in base 2
    (+inf there: their backward's exp2(s - lse) is then 0)."""
    lse = torch.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse.transpose(1, 2).contiguous()


def _from_kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_as_kernel_lse``."""
    lse = lse.transpose(1, 2)
    return torch.where(lse == float("inf"), float("-inf"), lse / LOG2E)


def backward(do, q, k, v, pk, pv, path_ids, mask, out, lse, causal: bool, scale: float):
    """dq, dk, dv, dprefix_k, dprefix_v (each in its input's dtype) from the forward's output and log-sum-exp
    ``[B, L, H]``."""
    keys, values = _keys(q, k, v, pk, pv, path_ids)
    acc = keys.dtype
    lse = _from_kernel_lse(lse)
    b, hkv, num_prefix = k.shape[0], k.shape[1], pk.shape[2]
    group = q.shape[1] // hkv
    do, out = do.to(acc), out.to(acc)
    if _fused(q):
        bias = _bias(q, num_prefix, mask, causal, acc)
        dq, dkeys, dvalues = _FUSED_BACKWARD(do, q.to(acc), keys, values, out, lse.to(acc), 0.0, False,
                                             attn_mask=bias, scale=scale)
    else:
        p, _ = _probabilities(q, keys, _visible(q, num_prefix, mask, causal), scale, lse.to(acc))
        ds = p * (do @ values.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
        dq = (ds @ keys) * scale
        dkeys = (ds.transpose(-1, -2) @ q.to(acc)) * scale
        dvalues = p.transpose(-1, -2) @ do
    dkeys = dkeys.reshape(b, hkv, group, *keys.shape[2:]).sum(2)  # the GQA group's query heads, summed
    dvalues = dvalues.reshape(b, hkv, group, *keys.shape[2:]).sum(2)
    # per path: a select-and-sum over the rows of that path (deterministic, no index_add atomics on any device;
    # a select, not a one-hot product, so that one path's NaN never reaches another path)
    of_path = (torch.arange(pk.shape[0], device=q.device)[:, None] == path_ids[None, :])[:, :, None, None, None]
    dpk = torch.where(of_path, dkeys[None, :, :, :num_prefix], 0.0).sum(1)
    dpv = torch.where(of_path, dvalues[None, :, :, :num_prefix], 0.0).sum(1)
    return (dq.to(q.dtype), dkeys[:, :, num_prefix:].to(k.dtype), dvalues[:, :, num_prefix:].to(v.dtype),
            dpk.to(pk.dtype), dpv.to(pv.dtype))


def _sequences(cu_seqlens: torch.Tensor):
    offsets = cu_seqlens.tolist()  # inside the op: never in a traced graph
    return [(s, a, b) for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])) if b > a]


def _padded(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[a:b].transpose(0, 1)[None]  # [T, H, D] slice -> [1, H, L, D]


def forward_varlen(q, k, v, pk, pv, cu_seqlens, path_ids, causal: bool, scale: float, differentiable: bool = False):
    """Packed layout: output ``[T, H, D]`` and log-sum-exp ``[T, H]``, one sequence at a time."""
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2], dtype=backend.accumulate_dtype(q), device=q.device)
    for s, a, b in _sequences(cu_seqlens):
        o, m = forward(_padded(q, a, b), _padded(k, a, b), _padded(v, a, b), pk, pv, path_ids[s:s + 1], None, causal,
                       scale, differentiable)
        out[a:b], lse[a:b] = o[0].transpose(0, 1), m[0]
    return out, lse


def backward_varlen(do, q, k, v, pk, pv, cu_seqlens, path_ids, out, lse, causal: bool, scale: float):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
    for s, a, b in _sequences(cu_seqlens):
        grads = backward(_padded(do, a, b), _padded(q, a, b), _padded(k, a, b), _padded(v, a, b), pk, pv,
                         path_ids[s:s + 1], None, _padded(out, a, b), lse[a:b][None], causal, scale)
        for full, g in zip((dq, dk, dv), grads[:3]):
            full[a:b] = g[0].transpose(0, 1)
        dpk += grads[3]
        dpv += grads[4]
    return dq, dk, dv, dpk, dpv
