"""Prefix-augmented attention: N paths of deep prefixes over padded or packed sequences.

Semantics are those of ``pdfkernels.reference.prefix_attention``. The fused Triton kernel is tracked
in the prefix-attention issue; until it lands every device runs the reference, and asking for the
Triton backend explicitly is an error rather than a silent fallback.
"""

from __future__ import annotations

import torch

from . import backend, reference
from .validation import check_prefix_attention, check_prefix_attention_varlen


def _refuse_triton(op: str) -> None:
    if backend.requested() == "triton":
        raise NotImplementedError(f"{op}: no Triton kernel yet ({backend.ENV_VAR}=triton was set); "
                                  f"unset it to run the PyTorch reference")


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, path_ids: torch.Tensor, *,
                     key_padding_mask: torch.Tensor | None = None, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Attention over ``[prefix of path_ids[b]; own keys]`` for padded rows. Shapes: q ``[B, H, L, D]``,
    k, v ``[B, Hkv, L, D]``, prefix_k, prefix_v ``[N, Hkv, K, D]``, path_ids ``[B]``, key_padding_mask
    ``[B, L]`` bool (True = real token). Returns q's shape and dtype."""
    scale = check_prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal,
                                   softmax_scale)
    _refuse_triton("prefix_attention")
    return reference.prefix_attention(q, k, v, prefix_k, prefix_v, path_ids,
                                      key_padding_mask=key_padding_mask, causal=causal, softmax_scale=scale)


def prefix_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                            path_ids: torch.Tensor, *, causal: bool = True,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """Packed sequences: q ``[T, H, D]``, k, v ``[T, Hkv, D]``, cu_seqlens int32 ``[S+1]``,
    path_ids ``[S]``. Returns ``[T, H, D]`` in q's dtype."""
    scale = check_prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids,
                                          causal, softmax_scale)
    _refuse_triton("prefix_attention_varlen")
    return reference.prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids,
                                             causal=causal, softmax_scale=scale)
