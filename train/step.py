"""One PDF training step (paper §3), with GradCache so the global batch does not depend on memory.

1. Chunked forward without gradients: embeddings ``[N, B, d]`` of queries and targets (and ``[N, B·H, d]`` of
   the H hard negatives per query, with ``--hard-negatives H``) for every path, the RNG state of each chunk saved.
2. Stage 1: the vCLUB estimator takes ``estimator_steps`` steps on the same detached embeddings (Eq. 4).
3. Stage 2, estimator frozen: loss = InfoNCE(aggregate) + lambda_con * mean_i InfoNCE(path i)
   + lambda_mim * MIM (Eqs. 5-8) on the cached embeddings (global batch across ranks; the gathered hard
   negatives join every query's InfoNCE candidates; they stay out of MIM and the estimator, which compare the
   paths of the same input); its gradients with respect to the embeddings are cached.
4. Chunk by chunk, forward again with gradients (RNG replayed) and backpropagate the cached gradients;
   then the backbone, prefix and aggregator take their step. Loss and gradients equal the full-batch step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdfkernels import models
from pdfkernels.models.contrastive import pdf_contrastive

from .losses import gather, path_cosine, world
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


def _paths(config) -> list[int] | None:
    return None if config.prefix_len == 0 else list(range(config.num_paths))


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _encode_chunks(parts: Parts, chunks: list[dict], paths, device, dtype: str) -> tuple[torch.Tensor, list]:
    reps, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state())
            with autocast(dtype, device):
                reps.append(models.encode(parts.model, chunk, paths).float())
    return torch.cat(reps, dim=1), states


def contrastive_loss(q: torch.Tensor, t: torch.Tensor, aggregator, config,
                     negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """InfoNCE(aggregate) + lambda_con * mean per-path InfoNCE, on global-batch embeddings ``[N, B, d]`` (hard
    negatives ``[N, M, d]`` added to every query's candidates)."""
    loss, agg, per_path = pdf_contrastive(q, t, aggregator, config.temperature, config.lambda_con,
                                          negatives=negatives)
    return loss, {"loss_agg": agg.detach(), "loss_path": per_path.detach()}


def estimator_updates(parts: Parts, q: torch.Tensor, t: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` estimator updates (Eq. 4) on the same detached query and target embeddings; returns the loss
    before the first update (the estimator's fit to this fresh batch, comparable whatever ``steps``)."""
    first = None
    for _ in range(steps):
        parts.estimator_optimizer.zero_grad(set_to_none=True)
        est = (parts.estimator.estimator_loss(q) + parts.estimator.estimator_loss(t)) / 2
        est.backward()
        average_gradients(parts.estimator_optimizer)
        parts.estimator_optimizer.step()
        first = est.detach() if first is None else first
    return first


def train_step(parts: Parts, query_chunks: list[dict], target_chunks: list[dict], config,
               device: torch.device, negative_chunks: list[dict] | None = None) -> dict:
    paths = _paths(config)
    q_local, q_states = _encode_chunks(parts, query_chunks, paths, device, config.dtype)
    t_local, t_states = _encode_chunks(parts, target_chunks, paths, device, config.dtype)
    negative_chunks = negative_chunks or []
    if negative_chunks:  # like the targets: cached without gradients, re-run chunk by chunk below
        n_local, n_states = _encode_chunks(parts, negative_chunks, paths, device, config.dtype)
        n_leaf = n_local.clone().requires_grad_()
    _, world_size = world()
    metrics: dict = {}

    # stage 1: the estimator learns q(h_i | h_j) on detached embeddings of this rank
    if config.trains_estimator:
        metrics["loss_estimator"] = estimator_updates(parts, q_local, t_local, config.estimator_steps)
        if not config.uses_mim:  # a probe only: the estimate is reported, nothing reaches the model
            with torch.no_grad():
                metrics["mi_estimate"] = (parts.estimator.mim_loss(q_local) + parts.estimator.mim_loss(t_local)) / 2

    # stage 2: losses on the cached embeddings; gradients cached for the re-forward
    q_leaf, t_leaf = q_local.clone().requires_grad_(), t_local.clone().requires_grad_()
    q_all, t_all = gather(q_leaf, dim=1), gather(t_leaf, dim=1)
    n_all = gather(n_leaf, dim=1) if negative_chunks else None
    loss, parts_metrics = contrastive_loss(q_all, t_all, parts.aggregator, config, n_all)
    metrics.update(parts_metrics)
    backward_loss = loss
    if config.uses_mim:
        mim = (parts.estimator.mim_loss(q_leaf) + parts.estimator.mim_loss(t_leaf)) / 2  # negatives span ranks
        metrics["mi_estimate"] = mim.detach()
        loss = loss + config.lambda_mim * mim
        # mim's gradients are exact per rank (not summed by a gather): scale so that the mean over ranks is exact
        backward_loss = backward_loss + config.lambda_mim * world_size * mim
    parts.optimizer.zero_grad(set_to_none=True)
    backward_loss.backward()
    q_grad, t_grad = q_leaf.grad, t_leaf.grad

    # re-forward chunk by chunk with gradients (RNG replayed), backpropagating the cached gradients
    passes = [(query_chunks, q_states, q_grad), (target_chunks, t_states, t_grad)]
    if negative_chunks:
        passes.append((negative_chunks, n_states, n_leaf.grad))
    for chunks, states, grad in passes:
        offset = 0
        for chunk, state in zip(chunks, states):
            rows = chunk["input_ids"].shape[0]
            _set_rng_state(state)
            with autocast(config.dtype, device):
                reps = models.encode(parts.model, chunk, paths).float()
            reps.backward(grad[:, offset:offset + rows])
            offset += rows
    average_gradients(parts.optimizer)
    if config.max_grad_norm > 0:
        params = [p for g in parts.optimizer.param_groups for p in g["params"] if p.grad is not None]
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()

    metrics["loss"] = loss.detach()
    metrics["path_cosine"] = path_cosine(q_local)
    if paths is not None:
        metrics["prefix_cosine"] = prefix_cosine(models.pdf_parameters(parts.model)[0])
    metrics.update(embedding_norms(torch.cat([q_local, t_local], dim=1)))
    metrics["lr"] = parts.scheduler.get_last_lr()[0]
    return {k: float(v) for k, v in metrics.items()}
