"""FLOP counts of the model-level variants against hand counts from the small Qwen2-VL's sizes (the CPU case of
bench/test_models.py): Linear/Conv weights x 2 x tokens, attention 4·D per visible (query, key) pair."""

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from pdfkernels import models
from pdfkernels.bench.flops import count_flops
from pdfkernels.models.architectures import small_qwen2vl

# small_qwen2vl: text width 256, 4 layers, 4 heads x 64 (2 KV heads), MLP 768; vision embed 64, 2 blocks,
# mlp_ratio 2, patch 14 (Conv3d 3 -> 64 over 2 x 14 x 14), merger 4·64 -> 256 -> 256. A 224x224 image:
# 16 x 16 = 256 patches, 64 merged tokens; 76 tokens in all (3 text, start, 64 image, end, 7 text).
TOKENS, PATCHES, MERGED, PREFIX = 76, 256, 64, 20
TEXT_WEIGHTS = 4 * (256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 768)
VISION_LINEAR = 2 * PATCHES * (64 * 3 * 2 * 14 * 14 + 2 * (64 * 192 + 64 * 64 + 64 * 128 + 128 * 64)) \
    + 2 * MERGED * (256 * 256 + 256 * 256)
VISION_ATTENTION = 4 * 64 * 2 * PATCHES ** 2


def _text_attention(prefix):
    return 4 * 64 * 4 * 4 * (prefix * TOKENS + TOKENS * (TOKENS + 1) // 2)


EXPECTED = {  # variant -> (paths argument, text copies, prefix per copy)
    "no-prefix": (None, 1, 0), "single-prefix": (0, 1, PREFIX), "two-paths": ([0, 1], 2, PREFIX)}


@pytest.fixture(scope="module")
def case():
    config = small_qwen2vl()
    model = Qwen2VLForConditionalGeneration(config).eval()
    ids = [11] * 3 + [config.vision_start_token_id] + [config.image_token_id] * MERGED \
        + [config.vision_end_token_id] + [12] * 7
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.randn(PATCHES, 3 * 2 * 14 * 14), "image_grid_thw": torch.tensor([[1, 16, 16]]),
              "mm_token_type_ids": (input_ids == config.image_token_id).long()}
    return model, inputs


def test_unpatched_forward_matches_the_hand_count(case):
    model, inputs = case
    with torch.no_grad():
        count = count_flops(model, lambda: models.patch.inner_model(model)(**inputs, use_cache=False))
    assert count.linear == 2 * TOKENS * TEXT_WEIGHTS + VISION_LINEAR
    assert (count.text_attention, count.vision_attention) == (_text_attention(0), VISION_ATTENTION)
    assert count.calls == {"text": 1, "vision": 1, "text_backward": 0, "vision_backward": 0}


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_patched_variants_match_the_hand_count(case, variant):
    model, inputs = case
    if not hasattr(model, "pdf_prefix"):
        models.apply_pdf(model, num_paths=2, prefix_len=PREFIX)
    paths, copies, prefix = EXPECTED[variant]
    with torch.no_grad():
        count = count_flops(model, lambda: models.encode(model, inputs, paths))
    assert count.linear == copies * 2 * TOKENS * TEXT_WEIGHTS + VISION_LINEAR
    assert count.text_attention == copies * _text_attention(prefix)
    assert count.vision_attention == VISION_ATTENTION


def test_backward_counts_when_a_backward_passes_through(case):
    """With gradients, every text Linear costs 3x its forward (input and weight gradients: everything trains here,
    the embeddings too) and attention 3.5x (2.5x for the backward); a frozen vision tower has no backward."""
    model, inputs = case
    if not hasattr(model, "pdf_prefix"):
        models.apply_pdf(model, num_paths=2, prefix_len=PREFIX)
    model.model.visual.requires_grad_(False)
    try:
        count = count_flops(model, lambda: models.encode(model, inputs, 0).sum().backward())
    finally:
        model.model.visual.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    assert count.calls == {"text": 1, "vision": 1, "text_backward": 1, "vision_backward": 0}
    assert count.text_attention == int(3.5 * _text_attention(PREFIX))
    assert count.vision_attention == VISION_ATTENTION
    assert count.linear == 3 * 2 * TOKENS * TEXT_WEIGHTS + VISION_LINEAR


@pytest.mark.parametrize("backbone", ["llava-next-mistral", "qwen2.5vl"])
def test_padded_batches_count_real_tokens_and_each_vision_block(backbone):
    """A padded batch of image and text-only rows (tests/models/builders.py): text attention over each row's real
    tokens only; vision attention per block the tower actually attends within (CLIP tiles of 4 x 4 patches and a
    class token; Qwen2.5-VL's windows and full-attention blocks from its cu_seqlens)."""
    from tests.models.builders import build_inputs, build_model

    model = build_model(backbone)
    inputs = build_inputs(backbone, model)
    models.apply_pdf(model, num_paths=2, prefix_len=3)
    text = models.text_config(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    lengths = inputs["attention_mask"].sum(1).tolist()
    expected_text = 4 * head_dim * text.num_attention_heads * text.num_hidden_layers * 2 * sum(
        3 * n + n * (n + 1) // 2 for n in lengths)
    seen = []
    inner = models.patch.inner_model(model)
    if backbone == "qwen2.5vl":  # two blocks (one windowed, one full), width 32
        def block(module, args, kwargs):
            sizes = (kwargs["cu_seqlens"][1:] - kwargs["cu_seqlens"][:-1]).tolist()
            seen.append(32 * sum(n * n for n in sizes))

        handles = [b.attn.register_forward_pre_hook(block, with_kwargs=True) for b in inner.visual.blocks]
    else:  # 2 CLIP layers of width 32, 17 tokens per tile
        handles = [inner.vision_tower.register_forward_pre_hook(
            lambda module, args: seen.append(2 * 32 * args[0].shape[0] * 17 ** 2))]
    with torch.no_grad():
        count = count_flops(model, lambda: models.encode(model, inputs, [0, 1]))
    for h in handles:
        h.remove()
    assert count.text_attention == expected_text
    assert count.vision_attention == 4 * sum(seen) > 0


@pytest.mark.parametrize("variant", ["baseline", "pdf"])
def test_train_step_attention_counts_both_gradcache_forwards_and_one_backward(variant):
    """The bench's train step (tiny preset, fully trained: no DoRA): each chunk's text and vision attention is
    counted twice forward (GradCache's gradient-free pass and the re-forward) and once backward (2.5x)."""
    from pdfkernels.bench.test_train_step import _setup

    step, parts, config, chunks = _setup(variant)
    count = count_flops(parts.model, step)
    text = models.text_config(parts.model)
    head_dim = text.hidden_size // text.num_attention_heads
    paths = 1 if config.prefix_len == 0 else config.num_paths
    forward = sum(4 * head_dim * text.num_attention_heads * text.num_hidden_layers * paths
                  * (config.prefix_len * n + n * (n + 1) // 2)
                  for chunk in chunks for n in chunk["attention_mask"].sum(1).tolist())
    assert count.text_attention == 2 * forward + 5 * forward // 2  # every chunk's forward is a multiple of 4
    assert count.calls["text"] == 2 * len(chunks) and count.calls["text_backward"] == len(chunks)
    vision = models.patch.inner_model(parts.model).config.vision_config
    with_images = [c["image_grid_thw"] for c in chunks if c.get("image_grid_thw") is not None]
    vision_forward = sum(4 * vision.embed_dim * vision.depth * int(t) * (int(h) * int(w)) ** 2
                         for grid in with_images for t, h, w in grid.tolist())
    assert with_images and count.calls["vision_backward"] == len(with_images)
    assert count.vision_attention == 2 * vision_forward + 5 * vision_forward // 2 and count.linear > 0
