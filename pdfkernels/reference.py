"""Plain-PyTorch references: the specification of every op in pdfkernels.

Literal and slow on purpose. Each computes in float32 (float64 when given float64) and returns the
input dtype. They do not validate their inputs; the public ops in ``pdfkernels`` do.
"""

from __future__ import annotations

import math

import torch

from .backend import accumulate_dtype

LOG_2PI = math.log(2.0 * math.pi)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, path_ids: torch.Tensor, *,
                     key_padding_mask: torch.Tensor | None = None, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of each row over its path's prefix keys followed by its own keys, in one softmax.

    q ``[B, H, L, D]``; k, v ``[B, Hkv, L, D]``; prefix_k, prefix_v ``[N, Hkv, K, D]``; path_ids ``[B]``;
    key_padding_mask ``[B, L]`` bool (True = real token). Query head h reads kv head ``h // (H // Hkv)``.
    The K prefix keys of ``path_ids[b]`` are visible to every query of row b; own key s is visible to
    query t when it is not padding and (if causal) ``s <= t``. A query with no visible key gives zeros.
    """
    ct = accumulate_dtype(q)
    b, h, length, d = q.shape
    group = h // k.shape[1]
    num_prefix = prefix_k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale

    keys = torch.cat([prefix_k[path_ids], k], dim=2).to(ct).repeat_interleave(group, dim=1)
    values = torch.cat([prefix_v[path_ids], v], dim=2).to(ct).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(ct), keys.transpose(-1, -2)) * scale  # [B, H, L, K + L]

    own_visible = torch.ones(b, length, length, dtype=torch.bool, device=q.device)
    if causal:
        own_visible = own_visible.tril()
    if key_padding_mask is not None:
        own_visible = own_visible & key_padding_mask[:, None, :]
    prefix_visible = torch.ones(b, length, num_prefix, dtype=torch.bool, device=q.device)
    visible = torch.cat([prefix_visible, own_visible], dim=2)[:, None]  # [B, 1, L, K + L]

    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs, values).to(q.dtype)


def prefix_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                            path_ids: torch.Tensor, *, causal: bool = True,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """Packed sequences: q ``[T, H, D]``, k, v ``[T, Hkv, D]``, sequence s spans
    ``cu_seqlens[s]:cu_seqlens[s+1]`` and uses prefix ``path_ids[s]``. Output ``[T, H, D]``.
    ``max_seqlen`` is only an upper bound on the lengths; the reference does not need it."""
    out = torch.empty_like(q)
    offsets = cu_seqlens.tolist()
    for s, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        if end == start:
            continue
        seq = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        o = prefix_attention(*seq, prefix_k, prefix_v, path_ids[s:s + 1], causal=causal,
                             softmax_scale=softmax_scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


def gaussian_loglik_pairwise(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` matrix with entry ``[k, m] = log N(y_k; mu_m, diag(exp(logvar_m)))``, from ``[B, d]`` inputs."""
    dtype, ct = y.dtype, accumulate_dtype(y)
    y, mu, logvar = y.to(ct), mu.to(ct), logvar.to(ct)
    diff = y[:, None, :] - mu[None, :, :]  # [B, B, d]
    terms = diff.square() * torch.exp(-logvar)[None] + logvar[None] + LOG_2PI
    return (-0.5 * terms.sum(-1)).to(dtype)


def mim_loss(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 5 from ``[N, B, d]`` inputs (``mu[j], logvar[j]`` = estimator on path j):
    mean over samples k and ordered pairs i != j of
    ``log q(y[i,k] | j,k) - mean_{m != k} log q(y[i,k] | j,m)``. Needs N >= 2 and B >= 2."""
    n, b, _ = y.shape
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=y.device)
    total = y.new_zeros((), dtype=accumulate_dtype(y))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            ll = gaussian_loglik_pairwise(y[i].to(total.dtype), mu[j].to(total.dtype), logvar[j].to(total.dtype))
            positive = ll.diagonal()
            negative = (ll * off_diagonal).sum(1) / (b - 1)
            total = total + (positive - negative).mean()
    return (total / (n * (n - 1))).to(y.dtype)


def estimator_nll(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The estimator's loss (Eq. 4) from ``[N, B, d]`` inputs:
    ``-mean over k and ordered pairs i != j of log q(y[i,k] | mu[j,k], logvar[j,k])``. Needs N >= 2."""
    ct = accumulate_dtype(y)
    n = y.shape[0]
    total = y.new_zeros((), dtype=ct)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            diff = y[i].to(ct) - mu[j].to(ct)
            terms = diff.square() * torch.exp(-logvar[j].to(ct)) + logvar[j].to(ct) + LOG_2PI
            total = total + (-0.5 * terms.sum(-1)).mean()
    return (-total / (n * (n - 1))).to(y.dtype)
