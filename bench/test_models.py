"""Model-level cost of PDF: unpatched forward against no prefix, one prefix and two paths in one call.

    pytest bench/test_models.py --benchmark-only

Every variant pools the last token from the multimodal model without the LM head (as ``models.encode``
does). GPU: the Qwen2-VL-2B architecture with random bf16 weights and one 1344x1344 image (2304 visual
tokens), and LLaVA-1.6-Mistral-7B with one 672x672 image. CPU: a small Qwen2-VL (``small_qwen2vl``) with one
224x224 image in fp32, labelled cpu. Compare the medians of one run: single prefix / unpatched (the paper
counts +0.06% FLOPs), two paths / unpatched (1.32x FLOPs). Each variant's FLOPs are counted on one extra call
(``bench/flops.py``, attention included), so TFLOP/s and MFU (GPU) follow from the median.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration

from pdfkernels import models
from pdfkernels.bench.common import CUDA, DEVICE, device_name, library_version
from pdfkernels.bench.flops import count_flops
from pdfkernels.bench.memory import cuda_peak_extra_bytes
from pdfkernels.bench.schema import timed_info
from pdfkernels.models.architectures import llava_next_7b, qwen2vl_2b, small_qwen2vl

DTYPE = torch.bfloat16 if CUDA else torch.float32
TEXT_TOKENS = 10


def _qwen2vl_case():
    config = qwen2vl_2b() if CUDA else small_qwen2vl()
    side = 1344 if CUDA else 224
    grid = side // config.vision_config.patch_size  # patches per side
    with torch.device(DEVICE):
        model = Qwen2VLForConditionalGeneration(config).to(DTYPE).eval()
    merged = grid * grid // config.vision_config.spatial_merge_size ** 2
    ids = [11] * 3 + [config.vision_start_token_id] + [config.image_token_id] * merged + [config.vision_end_token_id]
    ids += [12] * (TEXT_TOKENS - 3)
    input_ids = torch.tensor([ids], device=DEVICE)
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.randn(grid * grid, patch_dim, device=DEVICE, dtype=DTYPE),
              "image_grid_thw": torch.tensor([[1, grid, grid]], device=DEVICE),
              "mm_token_type_ids": (input_ids == config.image_token_id).long()}
    return model, inputs


def _llava_next_case():
    config = llava_next_7b()
    with torch.device(DEVICE):
        model = LlavaNextForConditionalGeneration(config).to(DTYPE).eval()
    pixel_values = torch.randn(1, 5, 3, 336, 336, device=DEVICE, dtype=DTYPE)  # base + 2x2 tiles of 672x672
    sizes = torch.tensor([[672, 672]], device=DEVICE)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output
    count = features[0].shape[0]
    ids = [11] * 3 + [config.image_token_index] * count + [12] * (TEXT_TOKENS - 3)
    input_ids = torch.tensor([ids], device=DEVICE)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
                   "image_sizes": sizes}


BACKBONES = {"qwen2vl-2b" if CUDA else "qwen2vl-small-cpu": _qwen2vl_case}
if CUDA:
    BACKBONES["llava-next-7b"] = _llava_next_case
VARIANTS = ["unpatched", "no-prefix", "single-prefix", "two-paths"]
_CACHE: dict = {}


def _case(backbone: str):
    if backbone not in _CACHE:
        _CACHE.clear()
        if CUDA:
            torch.cuda.empty_cache()
        unpatched, inputs = BACKBONES[backbone]()
        _CACHE[backbone] = (unpatched, inputs)
    return _CACHE[backbone]


def _forward(backbone: str, variant: str):
    model, inputs = _case(backbone)
    if variant == "unpatched":
        if hasattr(model, "pdf_prefix"):
            raise RuntimeError("unpatched must run before the patch")

        def run():
            hidden = models.patch.inner_model(model)(**inputs, use_cache=False).last_hidden_state
            return models.last_token(hidden, inputs["attention_mask"])
        return run
    if not hasattr(model, "pdf_prefix"):
        models.apply_pdf(model, num_paths=2, prefix_len=20)
    paths = {"no-prefix": None, "single-prefix": 0, "two-paths": [0, 1]}[variant]
    return lambda: models.encode(model, inputs, paths)


@pytest.mark.parametrize("variant", VARIANTS)  # in this order: unpatched first, then the patched model
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_model_forward(benchmark, backbone, variant):
    run = _forward(backbone, variant)

    def timed():
        with torch.no_grad():
            run()
        if CUDA:
            torch.cuda.synchronize()

    for _ in range(2):
        timed()
    model, inputs = _case(backbone)
    flops = count_flops(model, timed)
    benchmark.pedantic(timed, rounds=10 if CUDA else 5, iterations=1, warmup_rounds=1)
    shape = f"{backbone} 1 x {inputs['input_ids'].shape[1]} tokens"
    benchmark.extra_info.update(timed_info(
        variant, "fwd", shape, str(DTYPE).removeprefix("torch."), device_name(),
        library_version("transformers" if variant == "unpatched" else "pdfkernels"), flops=flops.total,
        peak_extra_bytes=cuda_peak_extra_bytes(timed) if CUDA else None,
        backbone=backbone, variant=variant, flop_count=flops.as_dict()))
