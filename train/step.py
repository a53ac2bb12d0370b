"""The lean trainer's PDF training step: an adapter over the one GradCache step (``models/gradcache.py``:
chunked forward without gradients, the estimator's stage 1, the objective's stage 2 on the global batch with
hard negatives, the cached-gradient re-forward). Here: the model's autocast, data parallelism without a wrapper
(every rank's gradients averaged once after the last chunk), clipping, the optimizer and scheduler steps and
the diagnostics. Loss and gradients equal the full-batch step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdfkernels import models
from pdfkernels.models.contrastive import pdf_contrastive
from pdfkernels.models.gradcache import QUERY, TARGET, Batch, Heads, Hooks, RandomState, gradcache_step
from pdfkernels.models.objective import LOSS_AGG, LOSS_PATH

from .losses import path_cosine, world
from .metrics import embedding_norms, prefix_cosine
from .precision import autocast


@dataclass
class Parts:
    model: torch.nn.Module
    aggregator: torch.nn.Module | None
    estimator: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    estimator_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler


def collate_chunks(collator, examples: list, size: int, device) -> list[dict]:
    """``examples`` as GradCache chunks of ``size`` collated rows on ``device``: what ``train_step`` takes (the
    trainer's loader builds them in its workers; benchmarks and tests call this)."""
    return [{k: v.to(device) for k, v in collator(examples[i:i + size]).items()}
            for i in range(0, len(examples), size)]


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Data parallelism without a wrapper: every rank's gradients averaged (what DDP's reducer does), once
    per step after all GradCache chunks, in a fixed order."""
    _, world_size = world()
    if world_size == 1:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size


def contrastive_loss(q: torch.Tensor, t: torch.Tensor, aggregator, config,
                     negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """InfoNCE(aggregate) + lambda_con * mean per-path InfoNCE, on global-batch embeddings ``[N, B, d]`` (hard
    negatives ``[N, M, d]`` added to every query's candidates)."""
    loss, agg, per_path = pdf_contrastive(q, t, aggregator, config.temperature, config.lambda_con,
                                          negatives=negatives)
    return loss, {LOSS_AGG: agg.detach(), LOSS_PATH: per_path.detach()}


def train_step(parts: Parts, query_chunks: list[dict], target_chunks: list[dict], config,
               device: torch.device, negative_chunks: list[dict] | None = None) -> dict:
    """One optimizer step of ``parts`` on this rank's chunks (``collate_chunks``; ``negative_chunks``: the
    queries' hard negatives, ``config.hard_negatives`` per query, query-major); returns the metrics."""
    objective = config.objective
    paths = objective.paths

    def encode(side: str, chunk: dict) -> torch.Tensor:
        with autocast(config.dtype, device):
            return models.encode(parts.model, chunk, paths)

    parts.optimizer.zero_grad(set_to_none=True)
    hooks = Hooks(random_state=lambda: RandomState(device), reduce=lambda: average_gradients(parts.optimizer))
    heads = Heads(parts.aggregator, parts.estimator, parts.estimator_optimizer)
    result = gradcache_step(encode, Batch(query_chunks, target_chunks, negative_chunks or []), objective,
                            config.temperature, heads, hooks)
    metrics = result.metrics
    if config.max_grad_norm > 0:
        params = [p for g in parts.optimizer.param_groups for p in g["params"] if p.grad is not None]
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()

    q_local, t_local = result.embeddings[QUERY], result.embeddings[TARGET]
    metrics["path_cosine"] = path_cosine(q_local)
    if paths is not None:
        metrics["prefix_cosine"] = prefix_cosine(models.pdf_parameters(parts.model)[0])
    metrics.update(embedding_norms(torch.cat([q_local, t_local], dim=1)))
    metrics["lr"] = parts.scheduler.get_last_lr()[0]
    return {k: float(v) for k, v in metrics.items()}
