"""Stop a run that has gone non-finite before it can overwrite good work.

A step whose loss terms or gradient norm are NaN/inf stops the run naming the step and the term; weights
that became non-finite are never checkpointed (so pruning can never drop the last finite checkpoint)."""

from __future__ import annotations

import math

import torch

# the step's metrics that must be finite, components first so that the message names the cause
TERMS = ("loss_agg", "loss_path", "mi_estimate", "loss_estimator", "grad_norm", "loss")


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; the message names the step and the term."""


def check_step(metrics: dict, step: int) -> None:
    """Raise when a loss term or the gradient norm of ``step`` (1-based) is not finite."""
    bad = [t for t in TERMS if t in metrics and not math.isfinite(metrics[t])]
    if bad:
        values = ", ".join(f"{t} = {metrics[t]}" for t in bad)
        raise NonFiniteError(f"step {step}: non-finite {bad[0]} ({values}); stopped without saving this state. "
                             f"Usual causes: a too large --lr or --estimator-lr, or a too small --temperature")


def check_state(parts, step: int) -> None:
    """Raise when a trainable weight of the model, aggregator or estimator is not finite after ``step``."""
    modules = {"model": parts.model, "aggregator": parts.aggregator, "estimator": parts.estimator}
    for label, module in modules.items():
        if module is None:
            continue
        for name, p in module.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise NonFiniteError(f"step {step}: {label} weight {name} is not finite; the checkpoint of this "
                                     f"step is not written (earlier checkpoints are kept)")
