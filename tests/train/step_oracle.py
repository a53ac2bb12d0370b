"""The PDF training step written directly on the full batch, for the tests that GradCache's chunked step
(``train.step.train_step``) must reproduce: the estimator step, then one forward with gradients."""

from __future__ import annotations

import pytest
import torch

from pdfkernels import models
from pdfkernels.train.step import contrastive_loss


def trainable_grads(parts) -> dict[str, torch.Tensor]:
    """Every trained parameter's gradient (model and aggregator), by name."""
    named = [(n, p) for n, p in parts.model.named_parameters() if p.requires_grad]
    named += [(f"aggregator.{n}", p) for n, p in parts.aggregator.named_parameters()]
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def full_batch_step(ref, collator, config, queries, targets, negatives=None):
    """(loss, gradients, hard-negative embeddings or None) of one direct step on ``ref``'s parts."""
    paths = list(range(config.num_paths))
    with torch.no_grad():
        q0, t0 = (models.encode(ref.model, collator(rows), paths) for rows in (queries, targets))
    ref.estimator_optimizer.zero_grad()
    ((ref.estimator.estimator_loss(q0) + ref.estimator.estimator_loss(t0)) / 2).backward()
    ref.estimator_optimizer.step()
    ref.optimizer.zero_grad()
    q, t = (models.encode(ref.model, collator(rows), paths) for rows in (queries, targets))
    n = None if negatives is None else models.encode(ref.model, collator(negatives), paths)
    loss, _ = contrastive_loss(q, t, ref.aggregator, config, n)
    loss = loss + config.lambda_mim * (ref.estimator.mim_loss(q) + ref.estimator.mim_loss(t)) / 2
    loss.backward()
    return loss, trainable_grads(ref), n


def assert_same_step(metrics: dict, cached: dict, loss: torch.Tensor, direct: dict) -> None:
    """The chunked step's loss and gradients equal the direct step's."""
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert direct.keys() == cached.keys() and len(direct) > 10
    for name in direct:
        torch.testing.assert_close(cached[name], direct[name], rtol=1e-4, atol=1e-6, msg=lambda m, k=name: f"{k}: {m}")
