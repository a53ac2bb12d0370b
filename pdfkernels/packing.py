"""Conversions between the packed (varlen) and padded layouts."""

from __future__ import annotations

import torch


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """int32 offsets ``[S+1]`` from sequence lengths (on ``device``, default torch's default device)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def packed_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     left_padding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, H, D]`` packed -> ``([S, H, max_seqlen, D]`` zero-padded, ``[S, max_seqlen]`` bool mask)."""
    offsets = cu_seqlens.tolist()
    num_seqs = len(offsets) - 1
    out = x.new_zeros(num_seqs, x.shape[1], max_seqlen, x.shape[2])
    mask = torch.zeros(num_seqs, max_seqlen, dtype=torch.bool, device=x.device)
    for s, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        lo = max_seqlen - (end - start) if left_padding else 0
        out[s, :, lo:lo + end - start] = x[start:end].transpose(0, 1)
        mask[s, lo:lo + end - start] = True
    return out, mask


def padded_to_packed(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[S, H, L, D]`` with a ``[S, L]`` mask -> ``[T, H, D]`` of the real tokens, in row order."""
    return x.transpose(1, 2)[mask]
