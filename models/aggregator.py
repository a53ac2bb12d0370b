"""The paper's aggregator (appendix A.2): learned softmax weights over the N path embeddings."""

from __future__ import annotations

import torch
from torch import nn


class Aggregator(nn.Module):
    """Concatenate N embeddings -> Linear(N·d, d) -> SiLU -> Linear(d, N) -> softmax -> weighted sum.

    ``forward(h)`` takes ``[N, B, d]`` and returns ``[B, d]``."""

    def __init__(self, dim: int, num_paths: int):
        super().__init__()
        self.dim, self.num_paths = dim, num_paths
        self.score = nn.Sequential(nn.Linear(num_paths * dim, dim), nn.SiLU(), nn.Linear(dim, num_paths))

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """Softmax weights ``[B, N]``."""
        if h.dim() != 3 or h.shape[0] != self.num_paths or h.shape[2] != self.dim:
            raise ValueError(f"Aggregator: argument 'h' expected shape [N={self.num_paths}, B, d={self.dim}], "
                             f"got {list(h.shape)}")
        flat = h.permute(1, 0, 2).reshape(h.shape[1], -1)  # [B, N·d], paths in order
        return torch.softmax(self.score(flat.to(self.score[0].weight.dtype)), dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weights(h).to(h.dtype)
        return torch.einsum("bn,nbd->bd", w, h)
