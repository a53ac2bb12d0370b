"""One PDF training step against the baseline VLM2Vec step on the same batch (train.step.train_step).

    pytest bench/test_train_step.py --benchmark-only

GPU: the Qwen2-VL-2B architecture, random bf16 weights, DoRA r=8, 8 (query, target) pairs of text and one
448x448 image. CPU: the tiny preset on 32 pairs of the generated shapes set, labelled cpu (no MFU).

Each variant's FLOPs are counted on one extra step (``bench/flops.py``: what the step executes, GradCache's
gradient-free forward included, attention included), so TFLOP/s and MFU follow from the median; the phases
(``bench/phases.py``) are medians over the timed steps.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from pdfkernels.bench.common import CUDA, DEVICE, device_name, library_version, sync
from pdfkernels.bench.flops import count_flops
from pdfkernels.bench.memory import cuda_peak_extra_bytes
from pdfkernels.bench.phases import PhaseTimer
from pdfkernels.bench.schema import timed_info
from pdfkernels.train import synthetic
from pdfkernels.train.config import TrainConfig, table3
from pdfkernels.train.data import ImageLoader, TrainSampler, example
from pdfkernels.train.model import build, make_collator
from pdfkernels.train.rows import load_train_rows
from pdfkernels.train.run import make_parts
from pdfkernels.train.step import collate_chunks, train_step

_DATA = Path(tempfile.mkdtemp(prefix="pdf-bench-")) / "shapes"
BATCH = 8 if CUDA else 32


def _setup(variant: str):
    if not (_DATA / "train").exists():
        synthetic.generate(_DATA, num_train=64, num_eval=2, seed=0)
    flags = {"baseline": table3("baseline"), "pdf": {}}[variant]
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
    q, t = collate_chunks(collator, queries, BATCH, DEVICE), collate_chunks(collator, targets, BATCH, DEVICE)
    return (lambda: train_step(parts, q, t, config, DEVICE)), parts, config, q + t


@pytest.mark.parametrize("variant", ["baseline", "pdf"])
def test_train_step(benchmark, variant):
    step, parts, config, _ = _setup(variant)

    def timed():
        step()
        sync()

    timed()
    flops = count_flops(parts.model, timed)
    paths = 1 if config.prefix_len == 0 else config.num_paths
    phases = PhaseTimer(parts.model, parts.optimizer, paths)
    per_step: list[dict] = []

    def timed_with_phases():
        timed()
        per_step.append(phases.phases())

    try:
        benchmark.pedantic(timed_with_phases, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        phases.remove()
    timed_steps = per_step[1:]  # the first is pedantic's warm-up round
    median_phases = {k: sorted(p[k] for p in timed_steps)[len(timed_steps) // 2] for k in timed_steps[0]}
    peak = cuda_peak_extra_bytes(timed) if CUDA else None  # beyond the weights, gradients and optimizer state
    dtype = "bf16 autocast" if CUDA else "fp32"
    benchmark.extra_info.update(timed_info(
        variant, "step", f"{config.model} {BATCH} pairs", dtype, device_name(), library_version("pdfkernels"),
        flops=flops.total, peak_extra_bytes=peak, num_paths=paths, flop_count=flops.as_dict(), phases_ms=median_phases,
        phase_timer=phases.timer))
