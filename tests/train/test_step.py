"""GradCache: the chunked step's loss and gradients equal a full-batch step computed directly."""

import pytest
import torch

from pdfkernels import models
from pdfkernels.train import synthetic
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader, TrainSampler, example
from pdfkernels.train.model import build, make_collator
from pdfkernels.train.rows import load_train_rows
from pdfkernels.train.run import chunks, make_parts
from pdfkernels.train.step import contrastive_loss, train_step
from tests.train.helpers import shapes_data


def _setup(tmp_path_factory, chunk_size, **overrides):
    data = shapes_data(tmp_path_factory.getbasetemp())
    config = TrainConfig(prefix_len=3, global_batch=6, chunk_size=chunk_size, max_grad_norm=0.0, lambda_mim=0.5,
                         temperature=0.1, image_dir=str(data / "images"),
                         train_data=[str(data / "train" / "t2i.jsonl"), str(data / "train" / "i2t.jsonl")],
                         **overrides)
    model, tokenizer, processor = build(config, synthetic.all_words(), torch.device("cpu"))
    model.train()
    torch.manual_seed(1)
    parts = make_parts(config, model, torch.device("cpu"))
    collator = make_collator(model, tokenizer, processor, 64)
    plan = TrainSampler([load_train_rows(p) for p in config.train_data], None, 0).plan(0, config.global_batch)
    queries, targets = zip(*(example(row, ImageLoader(config.image_dir)) for row in plan))
    queries, targets = list(queries), list(targets)
    return config, parts, collator, queries, targets


def _grads(parts):
    named = [(n, p) for n, p in parts.model.named_parameters() if p.requires_grad]
    named += [(f"aggregator.{n}", p) for n, p in parts.aggregator.named_parameters()]
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def test_gradcache_equals_full_batch_step(tmp_path_factory):
    # chunked step
    config, parts, collator, queries, targets = _setup(tmp_path_factory, chunk_size=2)
    metrics = train_step(parts, chunks(collator, queries, 2, "cpu"), chunks(collator, targets, 2, "cpu"), config,
                         torch.device("cpu"))
    cached = _grads(parts)

    # the same step written directly: estimator step, then one forward with gradients on the full batch
    config, ref, collator, queries, targets = _setup(tmp_path_factory, chunk_size=6)
    paths = list(range(config.num_paths))
    with torch.no_grad():
        q0 = models.encode(ref.model, collator(queries), paths)
        t0 = models.encode(ref.model, collator(targets), paths)
    ref.estimator_optimizer.zero_grad()
    ((ref.estimator.estimator_loss(q0) + ref.estimator.estimator_loss(t0)) / 2).backward()
    ref.estimator_optimizer.step()
    ref.optimizer.zero_grad()
    q = models.encode(ref.model, collator(queries), paths)
    t = models.encode(ref.model, collator(targets), paths)
    loss, _ = contrastive_loss(q, t, ref.aggregator, config)
    loss = loss + config.lambda_mim * (ref.estimator.mim_loss(q) + ref.estimator.mim_loss(t)) / 2
    loss.backward()
    direct = _grads(ref)

    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert direct.keys() == cached.keys() and len(direct) > 10
    for name in direct:
        torch.testing.assert_close(cached[name], direct[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_metrics_report_every_term(tmp_path_factory):
    config, parts, collator, queries, targets = _setup(tmp_path_factory, chunk_size=3)
    metrics = train_step(parts, chunks(collator, queries, 3, "cpu"), chunks(collator, targets, 3, "cpu"), config,
                         torch.device("cpu"))
    assert {"loss", "loss_agg", "loss_path", "loss_estimator", "mi_estimate", "path_cosine", "lr"} <= set(metrics)
    assert all(v == v for v in metrics.values())  # no NaN
