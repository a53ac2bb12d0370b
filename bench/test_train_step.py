"""One PDF training step against the baseline VLM2Vec step on the same batch (train.step.train_step).

    pytest bench/test_train_step.py --benchmark-only

GPU: the Qwen2-VL-2B architecture, random bf16 weights, DoRA r=8, 8 (query, target) pairs of text and one
448x448 image. CPU: the tiny preset on 32 pairs of the generated shapes set, labelled cpu.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from pdfkernels.bench.common import CUDA, DEVICE, device_name, sync
from pdfkernels.train import synthetic
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader, TrainSampler, example
from pdfkernels.train.model import build, make_collator
from pdfkernels.train.rows import load_train_rows
from pdfkernels.train.run import chunks, make_parts
from pdfkernels.train.step import train_step

_DATA = Path(tempfile.mkdtemp(prefix="pdf-bench-")) / "shapes"
BATCH = 8 if CUDA else 32


def _setup(variant: str):
    if not (_DATA / "train").exists():
        synthetic.generate(_DATA, num_train=64, num_eval=2, seed=0)
    flags = {"baseline": dict(baseline=True), "pdf": {}}[variant]
    config = TrainConfig(model="qwen2vl-2b" if CUDA else "tiny", global_batch=BATCH, chunk_size=BATCH,
                         image_dir=str(_DATA / "images"),
                         train_data=[str(_DATA / "train" / "t2i.jsonl"), str(_DATA / "train" / "i2t.jsonl")],
                         **flags)
    model, tokenizer, processor = build(config, synthetic.all_words(), DEVICE, image_side=448 if CUDA else 32)
    model.train()
    parts = make_parts(config, model, DEVICE)
    collator = make_collator(model, tokenizer, processor, config.max_length)
    plan = TrainSampler([load_train_rows(p) for p in config.train_data], None, 0).plan(0, BATCH)
    queries, targets = zip(*(example(row, ImageLoader(config.image_dir)) for row in plan))
    queries, targets = list(queries), list(targets)
    q, t = chunks(collator, queries, BATCH, DEVICE), chunks(collator, targets, BATCH, DEVICE)
    return lambda: train_step(parts, q, t, config, DEVICE)


@pytest.mark.parametrize("variant", ["baseline", "pdf"])
def test_train_step(benchmark, variant):
    step = _setup(variant)

    def timed():
        step()
        sync()

    timed()
    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"device": device_name(), "variant": variant, "pairs": BATCH})
