"""What people use today, written independently of ``pdfkernels.reference``.

These are the peers in the benchmarks and a second, independent check in the tests and the self-check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
