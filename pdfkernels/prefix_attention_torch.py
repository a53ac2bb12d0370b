"""The PyTorch path of prefix attention (CPU default): the math written out, forward and backward, in fp32 (fp64
for fp64 inputs). Explicit formulas rather than autograd over SDPA because they run inside a registered op,
below autograd. Same semantics as ``reference.prefix_attention``: every query sees its row's path prefix and its
own visible keys in one softmax; a query row that sees no key gives zeros."""

from __future__ import annotations

import torch


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return _acc(q)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _keys(q, k, v, pk, pv, path_ids):
    """Prefix then own keys and values, repeated over each GQA group: ``[B, H, K + L, D]`` in fp32."""
    acc, group = _acc(q), q.shape[1] // k.shape[1]
    keys = torch.cat([pk[path_ids], k], dim=2).to(acc).repeat_interleave(group, dim=1)
    values = torch.cat([pv[path_ids], v], dim=2).to(acc).repeat_interleave(group, dim=1)
    return keys, values


def _visible(q, num_prefix: int, mask, causal: bool) -> torch.Tensor:
    length = q.shape[2]
    own = torch.ones(length, length, dtype=torch.bool, device=q.device)
    own = own.tril() if causal else own
    own = own[None, None].expand(q.shape[0], 1, length, length)
    if mask is not None:
        own = own & mask[:, None, None, :]
    prefix = torch.ones(q.shape[0], 1, length, num_prefix, dtype=torch.bool, device=q.device)
    return torch.cat([prefix, own], dim=-1)  # [B, 1, L, K + L]


def _probabilities(q, keys, visible, scale: float, lse: torch.Tensor | None = None):
    scores = (q.to(keys.dtype) @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # a row seeing no key: zeros
    return torch.where(visible, torch.exp(scores - safe[..., None]), torch.zeros_like(scores)), lse


def forward(q, k, v, pk, pv, path_ids, mask, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (q's dtype) and the log-sum-exp ``[B, H, L]`` of each query's scores (fp32; fp64 for fp64)."""
    keys, values = _keys(q, k, v, pk, pv, path_ids)
    p, lse = _probabilities(q, keys, _visible(q, pk.shape[2], mask, causal), scale)
    return (p @ values).to(q.dtype), lse


def backward(do, q, k, v, pk, pv, path_ids, mask, out, lse, causal: bool, scale: float):
    """dq, dk, dv, dprefix_k, dprefix_v (each in its input's dtype) from the forward's output and log-sum-exp."""
    keys, values = _keys(q, k, v, pk, pv, path_ids)
    acc = keys.dtype
    p, _ = _probabilities(q, keys, _visible(q, pk.shape[2], mask, causal), scale, lse.to(acc))
    do, out = do.to(acc), out.to(acc)
    delta = (do * out).sum(-1, keepdim=True)
    ds = p * (do @ values.transpose(-1, -2) - delta)
    dq = (ds @ keys) * scale
    b, hkv, num_prefix = k.shape[0], k.shape[1], pk.shape[2]
    group = q.shape[1] // hkv
    dkeys = ((ds.transpose(-1, -2) @ q.to(acc)) * scale).view(b, hkv, group, *keys.shape[2:]).sum(2)
    dvalues = (p.transpose(-1, -2) @ do).view(b, hkv, group, *keys.shape[2:]).sum(2)
    # per path: a masked sum over the rows of that path (deterministic, no index_add atomics on any device)
    owner = (torch.arange(pk.shape[0], device=q.device)[:, None] == path_ids[None, :]).to(acc)  # [N, B]
    dpk = torch.einsum("nb,bhkd->nhkd", owner, dkeys[:, :, :num_prefix])
    dpv = torch.einsum("nb,bhkd->nhkd", owner, dvalues[:, :, :num_prefix])
    return (dq.to(q.dtype), dkeys[:, :, num_prefix:].to(k.dtype), dvalues[:, :, num_prefix:].to(v.dtype),
            dpk.to(pk.dtype), dpv.to(pv.dtype))


def _sequences(cu_seqlens: torch.Tensor):
    offsets = cu_seqlens.tolist()  # inside the op: never in a traced graph
    return [(s, a, b) for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])) if b > a]


def _padded(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[a:b].transpose(0, 1)[None]  # [T, H, D] slice -> [1, H, L, D]


def forward_varlen(q, k, v, pk, pv, cu_seqlens, path_ids, causal: bool, scale: float):
    """Packed layout: output ``[T, H, D]`` and log-sum-exp ``[T, H]``, one sequence at a time."""
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2], dtype=_acc(q), device=q.device)
    for s, a, b in _sequences(cu_seqlens):
        o, m = forward(_padded(q, a, b), _padded(k, a, b), _padded(v, a, b), pk, pv, path_ids[s:s + 1], None, causal,
                       scale)
        out[a:b], lse[a:b] = o[0].transpose(0, 1), m[0].transpose(0, 1)
    return out, lse


def backward_varlen(do, q, k, v, pk, pv, cu_seqlens, path_ids, out, lse, causal: bool, scale: float):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
    for s, a, b in _sequences(cu_seqlens):
        grads = backward(_padded(do, a, b), _padded(q, a, b), _padded(k, a, b), _padded(v, a, b), pk, pv,
                         path_ids[s:s + 1], None, _padded(out, a, b), lse[a:b].transpose(0, 1)[None], causal, scale)
        for full, g in zip((dq, dk, dv), grads[:3]):
            full[a:b] = g[0].transpose(0, 1)
        dpk += grads[3]
        dpv += grads[4]
    return dq, dk, dv, dpk, dpv
