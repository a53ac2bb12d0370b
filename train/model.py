"""The backbone, tokenizer and image processor for training: a local directory or a built-in architecture."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2VLForConditionalGeneration,
)

from pdfkernels import models
from pdfkernels.models.configs import llava_next_7b, qwen2vl_2b, qwen2vl_7b, tiny_llava_next, tiny_qwen2vl

from .config import VLM2VEC_TARGETS, TrainConfig
from .data import LlavaCollator, Qwen2VLCollator
from .precision import split_precision, uses_bf16

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def local_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built here from a word list (no hub): the special tokens, then the words."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    tokenizer = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=SPECIAL_TOKENS[2:])


def _processor_class(kind: str):
    """The image processor class of a backbone kind, preferring the PIL implementation (no torchvision)."""
    import transformers

    base = {"qwen2_vl": "Qwen2VLImageProcessor", "llava_next": "LlavaNextImageProcessor",
            "llava": "CLIPImageProcessor"}[kind]
    return getattr(transformers, base + "Pil", None) or getattr(transformers, base)


def image_processor(side: int | None = None, source: str | None = None, kind: str = "qwen2_vl", config=None):
    """A local directory's processor, the tiny presets' (images of ``side`` pixels), or the defaults."""
    cls = _processor_class(kind)
    if source is not None:
        return cls.from_pretrained(source, local_files_only=True)
    if kind == "qwen2_vl":
        if side is None:
            return cls()
        return cls(min_pixels=side * side, max_pixels=side * side, patch_size=4, merge_size=2, temporal_patch_size=2)
    vision = config.vision_config
    crop = {"height": vision.image_size, "width": vision.image_size}
    extra = {"image_grid_pinpoints": config.image_grid_pinpoints} if kind == "llava_next" else {}
    return cls(size={"shortest_edge": vision.image_size}, crop_size=crop, **extra)


def set_special_ids(config, tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids
    if getattr(config, "model_type", "") == "qwen2_vl":
        config.image_token_id = ids("<|image_pad|>")
        config.video_token_id = ids("<|video_pad|>")
        config.vision_start_token_id = ids("<|vision_start|>")
        config.vision_end_token_id = ids("<|vision_end|>")
    else:
        config.image_token_id = ids("<|image_pad|>")
        if hasattr(config, "image_token_index"):
            config.image_token_index = ids("<|image_pad|>")
    config.pad_token_id = tokenizer.pad_token_id


PRESETS = {
    "tiny": lambda vocab: tiny_qwen2vl(vocab_size=vocab),
    "tiny-llava-next": lambda vocab: tiny_llava_next("mistral", vocab_size=vocab),
    "qwen2vl-2b": lambda vocab: qwen2vl_2b(),
    "qwen2vl-7b": lambda vocab: qwen2vl_7b(),
    "llava-next-7b": lambda vocab: llava_next_7b(),
}
_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
            "llava": LlavaForConditionalGeneration}


def build(config: TrainConfig, words: list[str], device: torch.device, image_side: int = 32):
    """(model, tokenizer, image processor) for ``config.model``: a preset with random weights (the tokenizer
    built from ``words``) or a local directory loaded offline (in bf16 when training in bf16, so that a 7B
    backbone never exists in fp32). With ``--dtype bf16`` (the GPU default) the frozen weights end in bf16
    and the trainable ones in fp32."""
    bf16 = uses_bf16(config.dtype, device)
    if config.model in PRESETS:
        tokenizer = local_tokenizer(words)
        arch = PRESETS[config.model](len(tokenizer))
        kind = arch.model_type
        tiny = config.model.startswith("tiny")
        processor = image_processor(image_side if tiny else None, kind=kind, config=arch)
        set_special_ids(arch, tokenizer)
        torch.manual_seed(config.seed)
        with torch.device(device):
            model = _CLASSES[kind](arch)
    elif Path(config.model).is_dir():
        from transformers import AutoConfig, AutoTokenizer

        kind = AutoConfig.from_pretrained(config.model, local_files_only=True).model_type
        if kind not in _CLASSES:
            raise ValueError(f"config: model directory {config.model} holds a {kind!r} model; supported: "
                             f"{sorted(_CLASSES)}")
        tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        model = _CLASSES[kind].from_pretrained(config.model, local_files_only=True,
                                               dtype=torch.bfloat16 if bf16 else torch.float32).to(device)
        processor = image_processor(source=config.model, kind=kind)
    else:
        raise ValueError(f"config: 'model' expected a preset {sorted(PRESETS)} or a local directory, "
                         f"got {config.model!r}")
    models.apply_pdf(model, num_paths=config.num_paths, prefix_len=config.prefix_len, seed=config.seed)
    if config.lora_r:
        import peft

        lora = peft.LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, use_dora=True,
                               init_lora_weights="gaussian", target_modules=VLM2VEC_TARGETS)
        model = peft.get_peft_model(model, lora)
        models.mark_pdf_trainable(model)
    if config.prefix_len == 0:
        models.pdf_parameters(model)[0].requires_grad_(False)  # the baseline has no prefix to train
    if bf16:
        split_precision(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer, processor


def make_collator(model, tokenizer, processor, max_length: int):
    """The collator of the model's family."""
    hf = models.patch._hf_model(model)
    if type(hf).__name__.startswith("Qwen2VL"):
        return Qwen2VLCollator(tokenizer, processor, hf.config, max_length)
    return LlavaCollator(tokenizer, processor, model, max_length)
