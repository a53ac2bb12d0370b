"""Evaluation at MMEB scale: distinct queries and candidates encoded once (train.evaluate) against the
original loop that re-embeds each query's candidate list (bench/eval_per_query.py), on a generated
retrieval set of queries against one shared candidate pool.

    pytest bench/test_evaluation.py --benchmark-only

GPU: 1000 queries x 1000-candidate pool, the Qwen2-VL-2B architecture (random weights, bf16). CPU: the
tiny preset on 100 x 100 (20 x 20 with --quick). The original loop needs queries x (pool + 1) forwards per
mode, days at the GPU size: there it runs the first 20 queries and its figures are per query
(``seconds_per_query``). Extra info: forwards (rows through the model, all modes) and P@1; where both ran
the same rows their P@1 must agree."""

from __future__ import annotations

import pytest

from pdfkernels import models
from pdfkernels.bench.common import CUDA, DEVICE, QUICK, device_name, sync
from pdfkernels.bench.eval_per_query import precision_at_1
from pdfkernels.bench.mmeb_like import retrieval_rows
from pdfkernels.train import synthetic
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader
from pdfkernels.train.evaluate import evaluate_subset, mode_groups
from pdfkernels.train.model import build, make_collator

QUERIES = POOL = 1000 if CUDA else (20 if QUICK else 100)
OLD_QUERIES = 20 if CUDA else QUERIES
_RESULTS: dict = {}


def _setup():
    config = TrainConfig(model="qwen2vl-2b" if CUDA else "tiny", eval_batch_size=64, num_workers=0)
    model, tokenizer, processor = build(config, synthetic.all_words(), DEVICE)
    model.eval()
    aggregator = models.Aggregator(models.patch.hf_model(model).config.text_config.hidden_size,
                                   config.num_paths).to(DEVICE)
    return config, model, make_collator(model, tokenizer, processor, config.max_length), aggregator


def _old(config, model, collator, aggregator, rows):
    from pdfkernels.train.precision import autocast

    out = {}
    with autocast(config.dtype, DEVICE):
        for paths, group in mode_groups(config):
            for mode in group:
                use = [0] if mode == "single" else paths
                out[mode] = precision_at_1(model, collator, rows, ImageLoader(""), use, aggregator, DEVICE)
    return out


def _new(config, model, collator, aggregator, rows):
    result = evaluate_subset(model, collator, rows, ImageLoader(""), config, aggregator, DEVICE)
    return {k: v for k, v in result.items() if k != "chance"}


@pytest.mark.parametrize("variant", ["original-loop", "unique-once"])
def test_evaluation(benchmark, variant, monkeypatch):
    config, model, collator, aggregator = _setup()
    queries = OLD_QUERIES if variant == "original-loop" else QUERIES
    rows = retrieval_rows(queries, POOL)
    forwards = [0]
    original = models.encode

    def counting(model, inputs, paths):
        forwards[0] += inputs["input_ids"].shape[0]
        return original(model, inputs, paths)

    monkeypatch.setattr(models, "encode", counting)
    run = _old if variant == "original-loop" else _new

    def timed():
        forwards[0] = 0
        _RESULTS[variant] = run(config, model, collator, aggregator, rows)
        sync()

    benchmark.pedantic(timed, rounds=1, iterations=1)
    benchmark.extra_info.update({"device": device_name(), "variant": variant, "queries": queries, "pool": POOL,
                                 "forwards": forwards[0], "p_at_1": _RESULTS[variant],
                                 "seconds_per_query": benchmark.stats.stats.median / queries})
    if len(_RESULTS) == 2 and OLD_QUERIES == QUERIES:
        old, new = _RESULTS["original-loop"], _RESULTS["unique-once"]
        assert new == pytest.approx(old, abs=1.5 / QUERIES), (old, new)  # at most one near-tie apart
