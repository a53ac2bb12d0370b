"""Contrastive losses over the global batch (differentiable all-gather across ranks) and diagnostics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdfkernels.models.contrastive import gather, info_nce, world  # one copy, shared with the VLM2Vec integration

__all__ = ["gather", "info_nce", "path_cosine", "world"]


def path_cosine(reps: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the embeddings of different paths of the same input (``[N, B, d]``)."""
    n = reps.shape[0]
    if n < 2:
        return reps.new_zeros(())
    unit = F.normalize(reps.float(), dim=-1)
    sims = [(unit[i] * unit[j]).sum(-1).mean() for i in range(n) for j in range(i + 1, n)]
    return torch.stack(sims).mean()
