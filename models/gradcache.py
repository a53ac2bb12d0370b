"""The one GradCache step of the PDF objective, for both trainers (``train/step.py`` and the VLM2Vec
integration's ``training_step`` are adapters over it):

1. every chunk encoded without gradients (``encode(side, chunk) -> [N, b, d]``), its RNG state kept;
2. stage 1: ``estimator_steps`` vCLUB estimator updates (Eq. 4) on the detached embeddings gathered from every
   rank (the same data on every rank keeps the estimator identical there without a collective on its
   gradients);
3. stage 2, estimator frozen: InfoNCE(aggregate) + lambda_con * mean per-path InfoNCE over the global batch
   (in-batch, cross-rank and hard negatives; differentiable all-gather) + lambda_mim * MIM
   (``objective.objective_loss``); its gradients with respect to the embeddings are cached;
4. chunk by chunk, the forward again with gradients (RNG replayed) and the cached gradients backpropagated.

What differs between trainers comes in as hooks: how a loss is backpropagated (DDP's ``no_sync`` except on the
last chunk, DeepSpeed's engine, a GradScaler), how gradients are reduced after the last chunk, how the RNG is
replayed. Loss and gradients equal one process's direct step on the union batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from . import objective as names
from .contrastive import gather, world
from .objective import Objective, objective_loss

QUERY, TARGET, NEGATIVE = "query", "target", "negative"


class RandomState:
    """The RNG state before a chunk's first forward, replayed for its re-forward (dropout masks match); the
    replay leaves the outer stream where the first forwards left it."""

    def __init__(self, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.cuda = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(device) if self.cuda is not None else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.cuda] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.gpu, self.cuda)
            yield


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclasses.dataclass
class Hooks:
    """What a trainer changes in the step.

    - ``loss_backward(loss)``: stage 2's backward (a GradScaler scales here; the cached gradients then carry
      the scale into every chunk);
    - ``chunk_context(last)``: around a chunk's re-forward and backward, ``last`` True for the step's last
      chunk (DDP: ``no_sync`` on the others);
    - ``chunk_backward(surrogate, last)``: a chunk's backward (DeepSpeed: the engine's);
    - ``reduce()``: once after the last chunk (data parallelism without a wrapper);
    - ``random_state()``: a state to replay (``RandomState`` on the trainer's device)."""

    random_state: Callable[[], RandomState] = RandomState
    loss_backward: Callable[[torch.Tensor], None] = _backward
    chunk_backward: Callable[[torch.Tensor, bool], None] = lambda surrogate, last: surrogate.backward()
    chunk_context: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext()
    reduce: Callable[[], None] = lambda: None


@dataclasses.dataclass
class Heads:
    aggregator: torch.nn.Module | None
    estimator: torch.nn.Module | None
    estimator_optimizer: torch.optim.Optimizer | None


@dataclasses.dataclass
class Batch:
    """This rank's chunks per side (queries, targets, optionally hard negatives: H per query, query-major) and
    which negative rows are real (``negative_valid [B·H]``; None: all)."""

    queries: list
    targets: list
    negatives: list = dataclasses.field(default_factory=list)
    negative_valid: torch.Tensor | None = None

    def sides(self) -> list[tuple[str, list]]:
        return [(QUERY, self.queries), (TARGET, self.targets)] + ([(NEGATIVE, self.negatives)] if self.negatives
                                                                  else [])


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor  # the objective's value on the global batch (detached)
    metrics: dict  # tensors, by the names of models/objective.py
    embeddings: dict  # side -> this rank's detached embeddings [N, rows, d] (for diagnostics)


def gather_detached(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Every rank's ``x`` along ``dim``, without gradients."""
    _, world_size = world()
    if world_size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=dim)


def _estimator_updates(heads: Heads, q: torch.Tensor, t: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` updates on the same detached embeddings; the loss before the first (the estimator's fit to
    this fresh batch, comparable whatever ``steps``)."""
    first = None
    for _ in range(steps):
        heads.estimator_optimizer.zero_grad(set_to_none=True)
        est = (heads.estimator.estimator_loss(q) + heads.estimator.estimator_loss(t)) / 2
        est.backward()
        heads.estimator_optimizer.step()
        first = est.detach() if first is None else first
    return first


def gradcache_step(encode: Callable[[str, object], torch.Tensor], batch: Batch, objective: Objective,
                   temperature: float, heads: Heads, hooks: Hooks | None = None) -> StepResult:
    """One PDF step over ``batch`` (see the module's docstring); the caller steps the model's optimizer."""
    hooks = hooks or Hooks()
    sides = batch.sides()
    # 1. chunked forward without gradients
    reps, states = {}, {}
    with torch.no_grad():
        for side, chunks in sides:
            states[side], parts = [], []
            for chunk in chunks:  # the stream moves on from chunk to chunk (dropout masks differ)
                states[side].append(hooks.random_state())
                parts.append(encode(side, chunk).float())
            reps[side] = torch.cat(parts, dim=1)
    _, world_size = world()
    metrics: dict = {}

    # 2. stage 1: the estimator on every rank's detached embeddings
    if objective.trains_estimator:
        metrics[names.LOSS_ESTIMATOR] = _estimator_updates(heads, gather_detached(reps[QUERY]),
                                                           gather_detached(reps[TARGET]), objective.estimator_steps)

    # 3. stage 2: the loss on the cached embeddings, its gradients cached
    leaves = {side: r.clone().requires_grad_() for side, r in reps.items()}
    negatives = gather(leaves[NEGATIVE], dim=1) if NEGATIVE in leaves else None
    valid = None
    if negatives is not None and batch.negative_valid is not None:
        valid = gather_detached(batch.negative_valid.to(negatives.device, torch.bool), dim=0)
        metrics[names.NEGATIVES_SKIPPED] = (~valid).sum()
    loss, backward_loss, terms = objective_loss(
        objective, temperature, gather(leaves[QUERY], dim=1), gather(leaves[TARGET], dim=1), leaves[QUERY],
        leaves[TARGET], heads.aggregator, heads.estimator, negatives, valid, world_size)
    metrics.update(terms)
    hooks.loss_backward(backward_loss)

    # 4. re-forward chunk by chunk with gradients, backpropagating the cached gradients
    last = (sides[-1][0], len(sides[-1][1]) - 1)
    for side, chunks in sides:
        grad, offset = leaves[side].grad, 0
        for index, (chunk, state) in enumerate(zip(chunks, states[side])):
            is_last = (side, index) == last
            with hooks.chunk_context(is_last):
                with state.replay():
                    chunk_reps = encode(side, chunk).float()
                rows = chunk_reps.shape[1]
                surrogate = torch.dot(chunk_reps.flatten(), grad[:, offset:offset + rows].flatten())
                hooks.chunk_backward(surrogate, is_last)
            offset += rows
    hooks.reduce()
    metrics[names.LOSS] = loss.detach()
    return StepResult(loss.detach(), metrics, {side: r.detach() for side, r in reps.items()})
