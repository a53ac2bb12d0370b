"""Training data pipeline throughput against the model step on the same batch.

    pytest bench/test_data_pipeline.py --benchmark-only

Image-to-image pairs of 1344x1344 JPEGs through the Qwen2-VL image processor (its defaults, as a local
Qwen2-VL directory has them) and the collator, with 0, 2 and 4 data-loader workers (``TrainBatches``, as the
trainer runs it); ``pairs_per_s`` in the extra info. The model step: one PDF training step (``train_step``)
on one step's batch from the same pipeline: the Qwen2-VL-2B architecture (random weights, bf16 with fp32
trainable masters, DoRA r=8) on a GPU; on a CPU a tiny Qwen2-VL whose vision tower takes the same 14-pixel
patches (labelled ``tiny-cpu``: it shows the pipeline's cost beside a step, not a 2B step)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import torch

from pdfkernels.bench.common import CUDA, DEVICE, QUICK, device_name, sync
from pdfkernels.bench.mmeb_like import image_pairs
from pdfkernels.models.architectures import qwen2vl_2b, tiny_qwen2vl
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader, Qwen2VLCollator, TrainSampler
from pdfkernels.train.loader import StepShares, TrainBatches
from pdfkernels.train.model import image_processor, local_tokenizer, set_special_ids
from pdfkernels.train.rows import load_train_rows
from pdfkernels.train.synthetic import all_words

PAIRS = 32 if CUDA else (2 if QUICK else 4)  # pairs per step
STEPS = 4 if CUDA else (2 if QUICK else 4)
_DATA = Path(tempfile.mkdtemp(prefix="pdf-bench-pipeline-"))


def _collator(model_config) -> Qwen2VLCollator:
    tokenizer = local_tokenizer(all_words())
    set_special_ids(model_config, tokenizer)
    return Qwen2VLCollator(tokenizer, image_processor(model_type="qwen2_vl"), model_config)


def _model_config():
    if CUDA:
        return qwen2vl_2b()
    model_config = tiny_qwen2vl(len(local_tokenizer(all_words())))
    model_config.vision_config.patch_size = 14  # the real processor's patches
    model_config.text_config.max_position_embeddings = 4096
    return model_config


def _shares(collator) -> StepShares:
    rows = load_train_rows(str(image_pairs(_DATA, images=2 * PAIRS, rows=4 * PAIRS)))
    return StepShares(TrainSampler([rows], None, 0), ImageLoader(str(_DATA / "images")), collator, PAIRS, 0, 1,
                      PAIRS)


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_pipeline_pairs_per_s(benchmark, workers):
    collator = _collator(_model_config())
    shares = _shares(collator)

    def steps():
        for _ in TrainBatches(shares, 0, STEPS, DEVICE, num_workers=workers):
            pass
        sync()

    benchmark.pedantic(steps, rounds=2, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    tokens = int(shares[0]["queries"][0]["images"]["image_grid_thw"][0].prod()) // 4
    benchmark.extra_info.update({"device": device_name(), "workers": workers, "pairs": PAIRS * STEPS,
                                 "pairs_per_s": PAIRS * STEPS / seconds, "image_tokens": tokens,
                                 "cpus": torch.get_num_threads()})


def test_model_step_on_the_same_batch(benchmark):
    from transformers import Qwen2VLForConditionalGeneration

    from pdfkernels import models
    from pdfkernels.train.run import make_parts
    from pdfkernels.train.step import train_step

    model_config = _model_config()
    collator = _collator(model_config)
    config = TrainConfig(model="qwen2vl-2b" if CUDA else "tiny", global_batch=PAIRS, chunk_size=PAIRS,
                         lora_r=8 if CUDA else 0)
    with torch.device(DEVICE):
        model = Qwen2VLForConditionalGeneration(model_config)
    models.apply_pdf(model, num_paths=config.num_paths, prefix_len=config.prefix_len)
    if CUDA:
        import peft

        from pdfkernels.train.config import VLM2VEC_TARGETS
        from pdfkernels.train.precision import split_precision

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, use_dora=True, target_modules=VLM2VEC_TARGETS))
        models.mark_pdf_trainable(model)
        split_precision(model)
    model.train()
    parts = make_parts(config, model, DEVICE)
    _, queries, targets = next(iter(TrainBatches(_shares(collator), 0, 1, DEVICE, num_workers=0)))

    def step():
        train_step(parts, queries, targets, config, DEVICE)
        sync()

    tick = time.perf_counter()
    step()  # warm-up
    warm = time.perf_counter() - tick
    benchmark.pedantic(step, rounds=1 if not CUDA else 3, iterations=1)
    benchmark.extra_info.update({"device": device_name(), "model": "qwen2vl-2b" if CUDA else "tiny-cpu",
                                 "pairs": PAIRS, "pairs_per_s": PAIRS / benchmark.stats.stats.median,
                                 "first_step_s": warm})
