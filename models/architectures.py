"""Model architectures (Hugging Face configs) built locally, no hub: tiny ones for tests and CPU demos, the real
ones for speed work. The named presets that `--model` takes are in `families.py`."""

from __future__ import annotations

import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)

IMAGE_TOKEN_ID = 5  # tiny models: the image placeholder token id


def _qwen2vl(text: dict, vision: dict, mrope_section: list[int], rope_theta: float, *,
             config_class: type = Qwen2VLConfig, **extra) -> Qwen2VLConfig:
    """A Qwen2-VL (or Qwen2.5-VL: ``config_class``) config that builds the same model on transformers 4.52 (which
    reads the text fields flat, as real checkpoints store them) and 5.x (nested ``text_config``; ``rope_scaling``
    becomes ``rope_parameters``)."""
    text = dict(text, rope_theta=rope_theta, rope_scaling={"type": "mrope", "mrope_section": mrope_section})
    return config_class(**text, text_config=dict(text), vision_config=vision, **extra)


_TINY_SPECIAL_IDS = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=IMAGE_TOKEN_ID + 1,
                         vision_start_token_id=IMAGE_TOKEN_ID + 2, vision_end_token_id=IMAGE_TOKEN_ID + 3)


def tiny_qwen2vl(vocab_size: int = 128) -> Qwen2VLConfig:
    """Qwen2-VL architecture, 2 text layers of width 64 (4 heads / 2 KV heads), a 1-block vision tower."""
    return _qwen2vl(
        dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
        dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
             spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        mrope_section=[2, 3, 3], rope_theta=1e4, **_TINY_SPECIAL_IDS)


def tiny_qwen2_5vl(vocab_size: int = 128) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL architecture, 2 text layers of width 64, a 2-block vision tower (one windowed, one full)."""
    return _qwen2vl(
        dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
             spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1], in_channels=3),
        mrope_section=[2, 3, 3], rope_theta=1e4, config_class=Qwen2_5_VLConfig, **_TINY_SPECIAL_IDS)


def has_qwen3vl() -> bool:
    """Whether the installed transformers has Qwen3-VL (4.57 and later)."""
    return hasattr(transformers, "Qwen3VLConfig")


def _qwen3vl(text: dict, vision: dict, mrope_section: list[int], rope_theta: float, **extra):
    if not has_qwen3vl():
        raise ImportError(f"Qwen3-VL needs transformers >= 4.57; this is {transformers.__version__}")
    rope = {"rope_type": "default", "mrope_section": mrope_section, "mrope_interleaved": True}
    # 4.57 reads rope_theta / rope_scaling, 5.x rope_parameters (with the theta inside)
    text = dict(text, rope_theta=rope_theta, rope_scaling=rope, rope_parameters=dict(rope, rope_theta=rope_theta))
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                      tie_word_embeddings=text["tie_word_embeddings"], **extra)


def tiny_qwen3vl(vocab_size: int = 128):
    """Qwen3-VL architecture (q/k norms, interleaved M-RoPE, DeepStack), 2 text layers of width 64 with head_dim 32
    (not hidden / heads, as in the real models), a 2-block vision tower feeding DeepStack features to layer 0."""
    return _qwen3vl(
        dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
             tie_word_embeddings=True),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0],
             in_channels=3),
        mrope_section=[6, 5, 5], rope_theta=1e4, **_TINY_SPECIAL_IDS)


def _tiny_text(kind: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return MistralConfig(**common, sliding_window=256) if kind == "mistral" else LlamaConfig(**common)


def _tiny_clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=4, projection_dim=32)


def tiny_llava_next(text: str = "mistral", vocab_size: int = 128) -> LlavaNextConfig:
    """LLaVA-NeXT (AnyRes) with a tiny Mistral or Llama language model and a tiny CLIP vision tower."""
    return LlavaNextConfig(vision_config=_tiny_clip(), text_config=_tiny_text(text, vocab_size),
                           image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]],
                           vision_feature_layer=-1)


def tiny_llava(vocab_size: int = 128) -> LlavaConfig:
    """LLaVA-1.5 style with a tiny Llama language model and a tiny CLIP vision tower."""
    return LlavaConfig(vision_config=_tiny_clip(), text_config=_tiny_text("llama", vocab_size),
                       image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-1)


# the vision tower both Qwen2-VL sizes share (its output width, hidden_size, is the language model's)
_QWEN2_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, in_channels=3)


def qwen2vl_2b() -> Qwen2VLConfig:
    """The Qwen2-VL-2B architecture (2,208,985,600 parameters), for speed work with random weights."""
    return _qwen2vl(
        dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
             tie_word_embeddings=True, rms_norm_eps=1e-6),
        dict(_QWEN2_VISION, hidden_size=1536), mrope_section=[16, 24, 24], rope_theta=1e6)


def qwen2vl_7b() -> Qwen2VLConfig:
    """The Qwen2-VL-7B architecture, for speed work with random weights."""
    return _qwen2vl(
        dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
             tie_word_embeddings=False, rms_norm_eps=1e-6),
        dict(_QWEN2_VISION, hidden_size=3584), mrope_section=[16, 24, 24], rope_theta=1e6)


# Qwen2.5-VL-3B / -7B and Qwen3-VL-2B: the numbers of the published Qwen/*-Instruct config.json files (see the
# docs/models.md for where they were read); the vision tower is shared by the two Qwen2.5-VL sizes.
_QWEN2_5_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu", tokens_per_second=2)


def qwen2_5vl_3b() -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-3B architecture, for speed work with random weights."""
    return _qwen2vl(
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
             num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
             tie_word_embeddings=True, rms_norm_eps=1e-6),
        dict(_QWEN2_5_VISION, out_hidden_size=2048),
        mrope_section=[16, 24, 24], rope_theta=1e6, config_class=Qwen2_5_VLConfig)


def qwen2_5vl_7b() -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-7B architecture, for speed work with random weights."""
    return _qwen2vl(
        dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
             tie_word_embeddings=False, rms_norm_eps=1e-6),
        dict(_QWEN2_5_VISION, out_hidden_size=3584),
        mrope_section=[16, 24, 24], rope_theta=1e6, config_class=Qwen2_5_VLConfig)


def qwen3vl_2b():
    """The Qwen3-VL-2B architecture (the smallest Qwen3-VL), for speed work with random weights."""
    return _qwen3vl(
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
             tie_word_embeddings=True, rms_norm_eps=1e-6),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
             deepstack_visual_indexes=[5, 11, 17], in_channels=3, hidden_act="gelu_pytorch_tanh"),
        mrope_section=[24, 20, 20], rope_theta=5e6)


def llava_next_7b() -> LlavaNextConfig:
    """LLaVA-1.6-Mistral-7B: CLIP ViT-L/14-336 with AnyRes and a Mistral-7B language model."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=None, rope_theta=1e6)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                           vision_feature_layer=-2)


def small_qwen2vl() -> Qwen2VLConfig:
    """A small Qwen2-VL (4 layers of width 256, head_dim 64) for CPU timing of the model-level overheads."""
    return _qwen2vl(
        dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
             tie_word_embeddings=True),
        dict(depth=2, embed_dim=64, hidden_size=256, num_heads=2, mlp_ratio=2, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        mrope_section=[8, 12, 12], rope_theta=1e4, **_TINY_SPECIAL_IDS)
