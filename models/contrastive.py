"""The contrastive part of the PDF objective over the global batch (Eq. 7), shared by the lean trainer and the
VLM2Vec integration: InfoNCE with in-batch negatives across ranks through a differentiable all-gather, and
optionally hard negatives (embeddings of each query's given non-matches), gathered the same way and added to
every query's candidates."""

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


def info_nce(queries: torch.Tensor, targets: torch.Tensor, temperature: float,
             negatives: torch.Tensor | None = None, negative_valid: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE on cosine similarity: query k's positive is target k; the other targets and, when given, every
    row of ``negatives`` (``[M, d]``: the hard negatives of all queries) are its negatives; a row whose
    ``negative_valid [M]`` is False (a missing negative's placeholder) is no candidate."""
    candidates = targets if negatives is None else torch.cat([targets, negatives])
    q, t = F.normalize(queries.float(), dim=-1), F.normalize(candidates.float(), dim=-1)
    logits = q @ t.T / temperature
    if negatives is not None and negative_valid is not None:
        keep = torch.cat([torch.ones(targets.shape[0], dtype=torch.bool, device=logits.device),
                          negative_valid.to(logits.device, torch.bool)])
        logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def pdf_contrastive(q: torch.Tensor, t: torch.Tensor, aggregator, temperature: float, lambda_con: float,
                    negatives: torch.Tensor | None = None, negative_valid: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, agg, per_path)``: InfoNCE(aggregate) + lambda_con * mean_i InfoNCE(path i) on embeddings
    ``[N, B, d]``; with one path (no aggregator) all three are that path's InfoNCE. ``negatives`` ``[N, M, d]``
    (the hard negatives' embeddings per path) join every path's candidates, and their aggregate the aggregate's,
    except the rows ``negative_valid [M]`` marks False."""
    valid = negative_valid
    if q.shape[0] == 1:
        loss = info_nce(q[0], t[0], temperature, None if negatives is None else negatives[0], valid)
        return loss, loss, loss
    agg_negatives = None if negatives is None else aggregator(negatives)
    agg = info_nce(aggregator(q), aggregator(t), temperature, agg_negatives, valid)
    per_path = torch.stack([info_nce(q[i], t[i], temperature, None if negatives is None else negatives[i], valid)
                            for i in range(q.shape[0])]).mean()
    return agg + lambda_con * per_path, agg, per_path
