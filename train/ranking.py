"""Ranking metrics of one subset from its score matrix: Hit@1, NDCG@5 (linear gain, VLM2Vec's ``ndcg_linear``,
MMEB-V2's visdoc metric) and Recall@k, averaged over queries.

``scores[r, c]``: query r against candidate c (one matrix product per subset, gathered per row for MMEB's
candidate lists); ``relevance[r, c]`` >= 0, the gain of candidate c for query r (MMEB rows: 1 for the positive,
0 otherwise; visdoc rows: their qrels scores); ``valid[r, c]`` False for padding and for a candidate identical
to the positive. Ties go against the query: among equal scores the less relevant candidate ranks first, so an
all-equal score is no hit, as in Precision@1 (``hits``)."""

from __future__ import annotations

import torch

RECALL_AT = (1, 5, 10)
NDCG_AT = 5


def ranked_relevance(scores: torch.Tensor, relevance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each row's relevance in ranked order (best score first, ties least relevant first, invalid last)."""
    relevance = relevance.masked_fill(~valid, 0.0)
    scores = scores.masked_fill(~valid, float("-inf"))
    by_relevance = torch.argsort(relevance, dim=1, stable=True)  # ascending: ties keep this order below
    order = torch.argsort(scores.gather(1, by_relevance), dim=1, descending=True, stable=True)
    ranked = relevance.gather(1, by_relevance).gather(1, order)
    return ranked.masked_fill(~valid.gather(1, by_relevance).gather(1, order), 0.0)


def ranking_metrics(scores: torch.Tensor, relevance: torch.Tensor, valid: torch.Tensor | None = None
                    ) -> dict[str, float]:
    """``hit@1``, ``ndcg@5``, ``recall@1/5/10`` averaged over the rows of ``scores`` ``[R, C]``; every row needs
    a relevant valid candidate."""
    if scores.shape != relevance.shape:
        raise ValueError(f"ranking_metrics: 'scores' {tuple(scores.shape)} and 'relevance' "
                         f"{tuple(relevance.shape)} expected the same shape")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    relevance = relevance.double()
    if not bool(((relevance > 0) & valid).any(1).all()):
        raise ValueError("ranking_metrics: every query needs at least one relevant candidate")
    ranked = ranked_relevance(scores.double(), relevance, valid)
    count = (relevance.masked_fill(~valid, 0) > 0).sum(1).double()
    k = min(NDCG_AT, ranked.shape[1])
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=ranked.device) + 2)
    ideal = relevance.masked_fill(~valid, 0).sort(dim=1, descending=True).values[:, :k]
    out = {"hit@1": float((ranked[:, 0] > 0).double().mean()),
           f"ndcg@{NDCG_AT}": float(((ranked[:, :k] * discount).sum(1) / (ideal * discount).sum(1)).mean())}
    for at in RECALL_AT:
        out[f"recall@{at}"] = float(((ranked[:, :at] > 0).sum(1) / count).mean())
    return out
