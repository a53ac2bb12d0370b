"""Stop a run that has gone non-finite before it can overwrite good work.

A step whose loss terms, gradient norm or gradients are NaN/inf stops the run naming the step and the term.
A non-finite gradient cancels its optimizer's update (``GradientGuard``: the weights stay as they were), and
weights that became non-finite anyway are never checkpointed (so pruning never drops the last finite one)."""

from __future__ import annotations

import math

import torch

from pdfkernels.models.objective import LOSS, LOSS_AGG, LOSS_ESTIMATOR, LOSS_PATH, MI_ESTIMATE

# the step's metrics that must be finite, components first so that the message names the cause
TERMS = (LOSS_AGG, LOSS_PATH, MI_ESTIMATE, LOSS_ESTIMATOR, "grad_norm", LOSS)


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; the message names the step and the term."""


class GradientGuard:
    """Optimizer pre-step hooks: a non-finite gradient drops that optimizer's gradients (AdamW then skips the
    update, so the weights stay finite) and is remembered in ``bad`` for ``check_step`` to report."""

    def __init__(self, parts) -> None:
        self.bad: str | None = None
        self._names = {id(p): f"{label} weight {n}" for label, module in
                       (("model", parts.model), ("aggregator", parts.aggregator), ("estimator", parts.estimator))
                       if module is not None for n, p in module.named_parameters()}
        for optimizer in (parts.optimizer, parts.estimator_optimizer):
            if optimizer is not None:
                optimizer.register_step_pre_hook(self._check)

    def _check(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params or torch.stack([torch.isfinite(p.grad).all() for p in params]).all():
            return  # one device sync per step
        first = next(p for p in params if not torch.isfinite(p.grad).all())
        self.bad = self.bad or f"gradient of {self._names.get(id(first), 'a parameter')}"
        for p in params:
            p.grad = None


def check_step(metrics: dict, step: int, bad_gradient: str | None = None) -> None:
    """Raise when a loss term, the gradient norm or (``bad_gradient``, from ``GradientGuard``) a gradient of
    ``step`` (1-based) is not finite."""
    bad = [t for t in TERMS if t in metrics and not math.isfinite(metrics[t])]
    if bad or bad_gradient:
        values = ", ".join([f"{t} = {metrics[t]}" for t in bad] + ([f"non-finite {bad_gradient}; the update "
                                                                     f"was skipped"] if bad_gradient else []))
        raise NonFiniteError(f"step {step}: non-finite {bad[0] if bad else bad_gradient} ({values}); stopped "
                             f"without saving this state. Usual causes: a too large --lr or --estimator-lr, or a "
                             f"too small --temperature")


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
