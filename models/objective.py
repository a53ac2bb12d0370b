"""The PDF objective (paper §3, Eqs. 4-8), its one set of fields and its one set of metric names, shared by
the lean trainer (``pdfkernels.train``) and the VLM2Vec integration (``pdfkernels.integrations.vlm2vec``).
The GradCache step that runs it over chunks is ``models/gradcache.py``."""

from __future__ import annotations

import dataclasses

import torch

from .contrastive import pdf_contrastive

# The metric names both trainers report (the lean trainer's metrics.jsonl, VLM2Vec's logs as ``pdf/<name>``).
LOSS = "loss"  # the whole objective: contrastive + lambda_mim * MIM
LOSS_AGG = "loss_agg"  # InfoNCE of the aggregate
LOSS_PATH = "loss_path"  # mean per-path InfoNCE
MI_ESTIMATE = "mi_estimate"  # vCLUB's MIM term (Eq. 5), after the estimator's updates
LOSS_ESTIMATOR = "loss_estimator"  # the estimator's loss (Eq. 4) on the fresh batch, before its updates
NEGATIVES_SKIPPED = "negatives_skipped"  # hard-negative slots left out of the candidates (rows with fewer)
METRICS = (LOSS, LOSS_AGG, LOSS_PATH, MI_ESTIMATE, LOSS_ESTIMATOR, NEGATIVES_SKIPPED)


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and abs(value) < float("inf")


def uses_mim(num_paths: int, lambda_mim: float) -> bool:
    """The MIM term reaches the model: it is between paths, and weighted."""
    return num_paths > 1 and lambda_mim > 0


class ObjectiveError(ValueError):
    """An objective setting that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """The PDF objective's fields (the paper's defaults). ``temperature=None``: the caller's own (VLM2Vec's
    ``--temperature``); ``seed``: the prefix's and heads' initialisation (the same on every rank)."""

    num_paths: int = 2
    prefix_len: int = 20
    lambda_con: float = 1.0
    lambda_mim: float = 1e-4
    temperature: float | None = 0.02
    estimator_steps: int = 1
    estimator_lr: float = 1e-4
    hard_negatives: int = 0  # per query; 0: in-batch and cross-rank negatives only
    track_mi: bool = False  # with lambda_mim = 0: still train the estimator and report its MI estimate
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("num_paths", 1), ("prefix_len", 0), ("estimator_steps", 1), ("hard_negatives", 0),
                          ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ObjectiveError(f"'{name}' expected >= {low} (an int), got {value!r}")
        for name in ("lambda_con", "lambda_mim", "estimator_lr"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ObjectiveError(f"'{name}' expected >= 0 (a finite number), got {value!r}")
        # InfoNCE divides by it: 0 gives NaN losses at once; None: the caller's (VLM2Vec's --temperature)
        if self.temperature is not None and not (_finite(self.temperature) and self.temperature > 0):
            raise ObjectiveError(f"'temperature' expected a positive finite number, got {self.temperature!r}")
        if self.num_paths == 1 and self.lambda_mim > 0:
            raise ObjectiveError(f"'lambda_mim' ({self.lambda_mim}) needs 'num_paths' >= 2 (MIM is between paths; "
                                 f"with one path it would be silently off): set lambda_mim 0 or num_paths 2")
        if self.num_paths == 1 and self.track_mi:
            raise ObjectiveError("'track_mi' needs 'num_paths' >= 2 (the MI estimate is between paths)")
        if self.num_paths > 1 and self.prefix_len == 0:
            raise ObjectiveError(f"'num_paths' {self.num_paths} needs 'prefix_len' >= 1 (the paths differ only by "
                                 f"their prefixes)")

    @property
    def uses_mim(self) -> bool:
        return uses_mim(self.num_paths, self.lambda_mim)

    @property
    def trains_estimator(self) -> bool:
        """The vCLUB estimator exists and trains (for the MIM term or the probe)."""
        return self.uses_mim or (self.num_paths > 1 and self.track_mi)

    @property
    def paths(self) -> list[int] | None:
        """The paths every step encodes (``None``: the unpatched model, no prefix)."""
        return None if self.prefix_len == 0 else list(range(self.num_paths))


def objective_loss(objective: Objective, temperature: float, q_all: torch.Tensor, t_all: torch.Tensor,
                   q_local: torch.Tensor, t_local: torch.Tensor, aggregator, estimator,
                   negatives: torch.Tensor | None = None, negative_valid: torch.Tensor | None = None,
                   world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stage 2 on embeddings ``[N, B, d]``: ``(loss, backward_loss, metrics)``. ``*_all``: the global batch
    (gathered with gradients); ``*_local``: this rank's rows (MIM's; ``mim_loss`` spans ranks itself);
    ``negatives [N, M, d]`` (global) join every query's candidates where ``negative_valid [M]`` is True.
    ``backward_loss`` scales MIM by ``world_size``: its gradients are exact per rank (not summed by a gather),
    so the ranks' mean of them is exact."""
    loss, agg, per_path = pdf_contrastive(q_all, t_all, aggregator, temperature, objective.lambda_con,
                                          negatives=negatives, negative_valid=negative_valid)
    metrics = {LOSS_AGG: agg.detach(), LOSS_PATH: per_path.detach()}
    backward_loss = loss
    if objective.uses_mim:
        mim = (estimator.mim_loss(q_local) + estimator.mim_loss(t_local)) / 2
        metrics[MI_ESTIMATE] = mim.detach()
        loss = loss + objective.lambda_mim * mim
        backward_loss = backward_loss + objective.lambda_mim * world_size * mim
    elif objective.trains_estimator:  # a probe: the estimate is reported, nothing reaches the model
        with torch.no_grad():
            metrics[MI_ESTIMATE] = (estimator.mim_loss(q_local) + estimator.mim_loss(t_local)) / 2
    return loss, backward_loss, metrics
