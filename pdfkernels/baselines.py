"""What people use today, written independently of ``pdfkernels.reference``.

These are the peers in the benchmarks and a second, independent check in the tests and the self-check. The
prefix-attention peers are the ways a user would write prefix attention today, from the slowest to the fastest:
an explicit boolean mask (SDPA's masked paths), SDPA with a bottom-right causal bias and no mask tensor (its flash
or memory-efficient kernels; the same under a forced backend such as cuDNN), and flash-attn's varlen call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# aten kernels of SDPA and the backend each one is
SDPA_KERNELS = {
    "_scaled_dot_product_attention_math": "math",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_efficient_attention_forward": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def cat_sdpa_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                              prefix_v: torch.Tensor, path_ids: torch.Tensor,
                              key_padding_mask: torch.Tensor | None = None, causal: bool = True,
                              softmax_scale: float | None = None) -> torch.Tensor:
    """The Hugging Face / PEFT way: concatenate the prefix into K/V and run SDPA with an explicit mask."""
    b, _, length, _ = q.shape
    num_prefix = prefix_k.shape[2]
    keys = torch.cat([prefix_k[path_ids], k], dim=2)
    values = torch.cat([prefix_v[path_ids], v], dim=2)
    mask = torch.ones(b, 1, length, num_prefix + length, dtype=torch.bool, device=q.device)
    if causal:
        mask[..., num_prefix:] = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        mask[..., num_prefix:] &= key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=softmax_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sdpa_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                          prefix_v: torch.Tensor, path_ids: torch.Tensor, *,
                          key_padding_mask: torch.Tensor | None = None, causal: bool = True,
                          softmax_scale: float | None = None, backend: SDPBackend | None = None,
                          shared_mask: bool = False) -> torch.Tensor:
    """The fastest SDPA way: concatenate the prefix into K/V and pass ``causal_lower_right(L, K + L)`` (prefix
    visible to every query, causal over the own keys, bottom-right aligned), which SDPA's flash and memory-
    efficient kernels take without a mask tensor. ``backend`` forces one SDPA backend (``sdpa_kernel``): PyTorch
    raises when that backend cannot run the call. ``shared_mask`` passes the same pattern as one ``[L, K + L]``
    boolean tensor broadcast over batch and heads instead (for backends that take masks but not the bias, e.g.
    cuDNN, which the bias's flash/efficient dispatch bypasses). No padding: such a bias has no per-sequence
    lengths, so padded rows need the masked form (``cat_sdpa_prefix_attention``) or packing
    (``flash_attn_varlen_prefix_attention``)."""
    if key_padding_mask is not None:
        raise ValueError("sdpa_prefix_attention: argument 'key_padding_mask' expected None (a causal bias has no "
                         "padding; use cat_sdpa_prefix_attention or the packed form)")
    length, num_prefix = q.shape[2], prefix_k.shape[2]
    keys = torch.cat([prefix_k[path_ids], k], dim=2)
    values = torch.cat([prefix_v[path_ids], v], dim=2)
    bias = causal_lower_right(length, num_prefix + length) if causal else None
    if bias is not None and shared_mask:
        bias = bias._materialize(q.device)
    gqa = q.shape[1] != k.shape[1]
    if gqa and causal and not shared_mask and q.is_cuda and not _bias_takes_gqa(q, keys, values, backend):
        # the bias calls the memory-efficient kernel directly, which ignores enable_gqa: repeat the KV heads as
        # SDPA itself does for that kernel
        group = q.shape[1] // k.shape[1]
        keys, values, gqa = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), False
    if backend is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=softmax_scale, enable_gqa=gqa)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=softmax_scale, enable_gqa=gqa)


def _bias_takes_gqa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, backend: SDPBackend | None) -> bool:
    """Whether ``causal_lower_right`` will dispatch to the flash kernel (the one of its paths that takes GQA)."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    def check() -> bool:
        return can_use_flash_attention(SDPAParams(q, keys, values, None, 0.0, False, True))

    if backend is None:
        return check()
    with sdpa_kernel([backend]):
        return check()


def prefixed_varlen_keys(k: torch.Tensor, prefix: torch.Tensor, cu_seqlens: torch.Tensor,
                         path_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``[T, Hkv, D]`` keys (or values) with each sequence's prefix ``prefix[path_ids[s]]`` (``[N, Hkv, K, D]``)
    in front of its own: ``[T + S·K, Hkv, D]`` and their offsets ``cu_seqlens + K·s`` (one gather, differentiable)."""
    num_seqs, num_prefix = path_ids.shape[0], prefix.shape[2]
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=k.device), lengths, output_size=k.shape[0])
    token_dest = torch.arange(k.shape[0], device=k.device) + num_prefix * (seq_of_token + 1)
    steps = torch.arange(num_seqs, device=k.device)[:, None]
    prefix_dest = (cu[:-1, None] + num_prefix * steps + torch.arange(num_prefix, device=k.device)).flatten()
    rows = prefix[path_ids].transpose(1, 2).reshape(num_seqs * num_prefix, *k.shape[1:])
    source = torch.cat([k, rows])
    order = token_dest.new_empty(source.shape[0])
    order[torch.cat([token_dest, prefix_dest])] = torch.arange(source.shape[0], device=k.device)
    offsets = cu_seqlens + num_prefix * torch.arange(num_seqs + 1, device=k.device, dtype=cu_seqlens.dtype)
    return source.index_select(0, order), offsets


def flash_attn_varlen_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                                       prefix_v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                       path_ids: torch.Tensor, *, causal: bool = True,
                                       softmax_scale: float | None = None,
                                       varlen_fn: Callable | None = None) -> torch.Tensor:
    """flash-attn's way on packed ``[T, H, D]`` sequences: keys ``[prefix; own]`` per sequence with
    ``cu_seqlens_k = cu_seqlens_q + K·s`` and ``causal=True``, which flash-attn aligns bottom-right when keys
    outnumber queries (prefix visible to all). ``varlen_fn`` defaults to ``flash_attn.flash_attn_varlen_func``."""
    if varlen_fn is None:
        from flash_attn import flash_attn_varlen_func as varlen_fn
    keys, cu_k = prefixed_varlen_keys(k, prefix_k, cu_seqlens, path_ids)
    values, _ = prefixed_varlen_keys(v, prefix_v, cu_seqlens, path_ids)
    return varlen_fn(q, keys, values, cu_seqlens, cu_k, max_seqlen, max_seqlen + prefix_k.shape[2],
                     softmax_scale=softmax_scale, causal=causal)


def sdpa_backends_run(fn: Callable[[], object]) -> tuple[str, ...]:
    """The SDPA backends ``fn()`` actually ran, in first-run order, read off the profiler's aten events (a
    dispatch mode cannot be used: ``causal_lower_right`` refuses to build under one); ``()`` when none ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = (e.name.removeprefix("aten::") for e in prof.events())
    return tuple(dict.fromkeys(SDPA_KERNELS[n] for n in names if n in SDPA_KERNELS))


def club_broadcast_mim(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. 5 the way CLUB's reference code computes negatives: a ``[B, B, d]`` broadcast per path pair."""
    n, b, _ = y.shape
    log_2pi = torch.log(torch.tensor(2 * torch.pi, dtype=y.dtype, device=y.device))
    total = y.new_zeros(())
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            inv_var = torch.exp(-logvar[j])
            positive = -0.5 * ((y[i] - mu[j]).square() * inv_var + logvar[j] + log_2pi).sum(-1)
            pair = -0.5 * ((y[i][:, None] - mu[j][None]).square() * inv_var[None] + logvar[j][None]
                           + log_2pi).sum(-1)  # [B, B]: anchor k, conditioning sample m
            negative = (pair.sum(1) - pair.diagonal()) / (b - 1)
            total = total + (positive - negative).mean()
    return total / (n * (n - 1))
