"""Contrastive losses over the global batch (differentiable all-gather across ranks) and diagnostics."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, keeping gradients (their backward sums over ranks)."""
    if world()[1] == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=dim)


def info_nce(queries: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives on cosine similarity: query k's positive is target k."""
    q, t = F.normalize(queries.float(), dim=-1), F.normalize(targets.float(), dim=-1)
    logits = q @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def path_cosine(reps: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the embeddings of different paths of the same input (``[N, B, d]``)."""
    n = reps.shape[0]
    if n < 2:
        return reps.new_zeros(())
    unit = F.normalize(reps.float(), dim=-1)
    sims = [(unit[i] * unit[j]).sum(-1).mean() for i in range(n) for j in range(i + 1, n)]
    return torch.stack(sims).mean()
