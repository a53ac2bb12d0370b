"""The backbone, tokenizer and image processor for training: a local directory or a built-in architecture."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration

import models
from models.configs import qwen2vl_2b, qwen2vl_7b, tiny_qwen2vl

from .config import VLM2VEC_TARGETS, TrainConfig

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


def _image_processor_class():
    try:  # transformers >= 5.x with the PIL path split out (no torchvision needed)
        from transformers import Qwen2VLImageProcessorPil as cls
    except ImportError:
        from transformers import Qwen2VLImageProcessor as cls
    return cls


def image_processor(side: int | None = None, source: str | None = None):
    cls = _image_processor_class()
    if source is not None:
        return cls.from_pretrained(source, local_files_only=True)
    if side is None:
        return cls()
    return cls(min_pixels=side * side, max_pixels=side * side, patch_size=4, merge_size=2, temporal_patch_size=2)


def set_special_ids(config, tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids
    config.image_token_id = ids("<|image_pad|>")
    config.video_token_id = ids("<|video_pad|>")
    config.vision_start_token_id = ids("<|vision_start|>")
    config.vision_end_token_id = ids("<|vision_end|>")
    config.pad_token_id = tokenizer.pad_token_id


def build(config: TrainConfig, words: list[str], device: torch.device, image_side: int = 32):
    """(model, tokenizer, image processor) for ``config.model``: a preset with random weights (the tokenizer
    built from ``words``) or a local directory loaded offline."""
    if config.model == "tiny" or config.model in ("qwen2vl-2b", "qwen2vl-7b"):
        tokenizer = local_tokenizer(words)
        if config.model == "tiny":
            arch, processor = tiny_qwen2vl(vocab_size=len(tokenizer)), image_processor(image_side)
        else:
            arch, processor = (qwen2vl_2b() if config.model == "qwen2vl-2b" else qwen2vl_7b()), image_processor()
        set_special_ids(arch, tokenizer)
        torch.manual_seed(config.seed)
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(arch)
    elif Path(config.model).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        model = Qwen2VLForConditionalGeneration.from_pretrained(config.model, local_files_only=True).to(device)
        processor = image_processor(source=config.model)
    else:
        raise ValueError(f"config: 'model' expected a preset {('tiny', 'qwen2vl-2b', 'qwen2vl-7b')} or a local "
                         f"directory, got {config.model!r}")
    models.apply_pdf(model, num_paths=config.num_paths, prefix_len=config.prefix_len, seed=config.seed)
    if config.lora_r:
        import peft

        lora = peft.LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, use_dora=True,
                               init_lora_weights="gaussian", target_modules=VLM2VEC_TARGETS)
        model = peft.get_peft_model(model, lora)
        models.mark_pdf_trainable(model)
    if config.prefix_len == 0:
        models.pdf_parameters(model)[0].requires_grad_(False)  # the baseline has no prefix to train
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer, processor
