"""GradCache: the chunked step's loss and gradients equal a full-batch step computed directly; the estimator's
K updates, the MI probe, the diagnostics and the negative-MI warning."""

import logging

import pytest
import torch
import torch.nn.functional as F

from pdfkernels import models
from pdfkernels.train import synthetic
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader, TrainSampler, example
from pdfkernels.train.metrics import NegativeMIWatch
from pdfkernels.train.model import build, make_collator
from pdfkernels.train.rows import load_train_rows
from pdfkernels.train.run import make_parts
from pdfkernels.train.step import collate_chunks, train_step
from tests.train.helpers import shapes_data
from tests.train.mim_helpers import anti_estimator
from tests.train.step_oracle import assert_same_step, full_batch_step, trainable_grads


def _setup(tmp_path_factory, chunk_size, **overrides):
    data = shapes_data(tmp_path_factory.getbasetemp())
    overrides = {"lambda_mim": 0.5, **overrides}
    config = TrainConfig(prefix_len=3, global_batch=6, chunk_size=chunk_size, max_grad_norm=0.0,
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


def test_gradcache_equals_full_batch_step(tmp_path_factory):
    # chunked step
    config, parts, collator, queries, targets = _setup(tmp_path_factory, chunk_size=2)
    metrics = train_step(parts, collate_chunks(collator, queries, 2, "cpu"),
                         collate_chunks(collator, targets, 2, "cpu"), config, torch.device("cpu"))
    cached = trainable_grads(parts)

    # the same step written directly: estimator step, then one forward with gradients on the full batch
    config, ref, collator, queries, targets = _setup(tmp_path_factory, chunk_size=6)
    loss, direct, _ = full_batch_step(ref, collator, config, queries, targets)
    assert_same_step(metrics, cached, loss, direct)


def test_metrics_report_every_term(tmp_path_factory):
    config, parts, collator, queries, targets = _setup(tmp_path_factory, chunk_size=3)
    metrics = train_step(parts, collate_chunks(collator, queries, 3, "cpu"),
                         collate_chunks(collator, targets, 3, "cpu"), config, torch.device("cpu"))
    assert {"loss", "loss_agg", "loss_path", "loss_estimator", "mi_estimate", "path_cosine", "prefix_cosine",
            "emb_norm_0", "emb_norm_1", "lr"} <= set(metrics)
    assert all(v == v for v in metrics.values())  # no NaN
    prefix = models.pdf_parameters(parts.model)[0]  # [layers, N, 2, Hkv, K, D], after the step
    direct = F.cosine_similarity(prefix[:, 0].flatten(), prefix[:, 1].flatten(), dim=0)
    assert metrics["prefix_cosine"] == pytest.approx(direct.item(), rel=1e-5, abs=1e-7)


def _run_step(parts, collator, queries, targets, config, chunk_size=3) -> dict:
    return train_step(parts, collate_chunks(collator, queries, chunk_size, "cpu"),
                      collate_chunks(collator, targets, chunk_size, "cpu"), config, torch.device("cpu"))


def test_estimator_steps_runs_k_estimator_updates_then_one_model_update(tmp_path_factory):
    config, parts, collator, queries, targets = _setup(tmp_path_factory, chunk_size=3, estimator_steps=3)
    counts = {"estimator": 0, "model": 0}
    parts.estimator_optimizer.register_step_post_hook(lambda *_: counts.update(estimator=counts["estimator"] + 1))
    parts.optimizer.register_step_post_hook(lambda *_: counts.update(model=counts["model"] + 1))
    paths = list(range(config.num_paths))
    with torch.no_grad():  # the estimator's loss on this batch before any update: what the step reports
        q, t = (models.encode(parts.model, collator(rows), paths) for rows in (queries, targets))
        first = (parts.estimator.estimator_loss(q) + parts.estimator.estimator_loss(t)) / 2
    metrics = _run_step(parts, collator, queries, targets, config)
    assert counts == {"estimator": 3, "model": 1}
    assert metrics["loss_estimator"] == pytest.approx(first.item(), rel=1e-5)


def test_mi_probe_reports_the_estimate_without_touching_the_model(tmp_path_factory):
    runs = []
    for track in (False, True):
        config, parts, collator, queries, targets = _setup(tmp_path_factory, chunk_size=3, lambda_mim=0.0,
                                                           track_mi=track, estimator_steps=2)
        runs.append((_run_step(parts, collator, queries, targets, config),
                     {n: p.detach().clone() for n, p in parts.model.named_parameters()}))
    (plain, plain_params), (probe, probe_params) = runs
    assert "mi_estimate" not in plain and {"mi_estimate", "loss_estimator"} <= set(probe)
    assert probe["loss"] == plain["loss"]
    for name, value in plain_params.items():
        torch.testing.assert_close(probe_params[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_a_negative_mi_estimate_is_warned(tmp_path_factory, caplog):
    config, parts, collator, queries, targets = _setup(tmp_path_factory, chunk_size=3, estimator_lr=0.0)
    anti_estimator(parts.estimator)  # kept as it is: the estimator's learning rate is 0
    watch = NegativeMIWatch(run=2, every=10)
    with caplog.at_level(logging.WARNING, logger="pdf"):
        for step in (1, 2):
            metrics = {**_run_step(parts, collator, queries, targets, config), "step": step}
            assert metrics["mi_estimate"] < 0
            watch.update(metrics)
    assert watch.warnings == 1
    assert "step 2: the vCLUB MI estimate has been negative for 2 steps" in caplog.text
