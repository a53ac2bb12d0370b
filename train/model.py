"""The backbone, tokenizer and image processor for training: a local directory or a built-in architecture."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from pdfkernels import models
from pdfkernels.models.families import FAMILIES, PRESETS, Family, family, load_local, model_class

from .config import VLM2VEC_TARGETS, TrainConfig
from .data import LlavaCollator, Qwen2VLCollator, takes_token_types
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


def _processor_class(entry: Family):
    """The family's image processor class, preferring the PIL implementation (no torchvision)."""
    return getattr(transformers, entry.processor + "Pil", None) or getattr(transformers, entry.processor)


def image_processor(side: int | None = None, source: str | None = None, model_type: str = "qwen2_vl",
                    model_config=None):
    """A local directory's processor, the tiny presets' (images of ``side`` pixels), or the defaults; a Qwen-VL
    processor cuts the patches the architecture ``model_config`` embeds (Qwen3-VL: 16 pixels, with its 0.5
    mean/std)."""
    entry = family(model_type, "the model for the image processor")
    cls = _processor_class(entry)
    if source is not None:
        return cls.from_pretrained(source, local_files_only=True)
    if entry.inputs == "qwen":
        if model_config is None:
            if side is not None:
                raise ValueError("image_processor: images of a given side need the architecture's config")
            return cls()
        vision = model_config.vision_config
        extra = {} if entry.image_mean_std is None else dict(image_mean=[entry.image_mean_std] * 3,
                                                              image_std=[entry.image_mean_std] * 3)
        low, high = (side * side,) * 2 if side is not None else entry.pixels
        extra.update(min_pixels=low, max_pixels=high)
        return cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                   temporal_patch_size=vision.temporal_patch_size, **extra)
    vision = model_config.vision_config
    crop = {"height": vision.image_size, "width": vision.image_size}
    pinpoints = getattr(model_config, "image_grid_pinpoints", None)  # LLaVA-NeXT's AnyRes
    extra = {} if pinpoints is None else {"image_grid_pinpoints": pinpoints}
    return cls(size={"shortest_edge": vision.image_size}, crop_size=crop, **extra)


def set_special_ids(model_config, tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids
    entry = FAMILIES.get(getattr(model_config, "model_type", ""))
    model_config.image_token_id = ids("<|image_pad|>")
    if entry is not None and entry.inputs == "qwen":
        model_config.video_token_id = ids("<|video_pad|>")
        model_config.vision_start_token_id = ids("<|vision_start|>")
        model_config.vision_end_token_id = ids("<|vision_end|>")
    elif hasattr(model_config, "image_token_index"):
        model_config.image_token_index = ids("<|image_pad|>")
    model_config.pad_token_id = tokenizer.pad_token_id


def backbone(config: TrainConfig, words: list[str], device: torch.device, image_side: int = 32):
    """(backbone, tokenizer, image processor) for ``config.model``, before PDF: a preset with random weights
    (the tokenizer built from ``words``; on ``device``, the meta device included) or a local directory loaded
    offline (in bf16 when training in bf16, so that a 7B backbone never exists in fp32)."""
    if config.model in PRESETS:
        model_type, architecture = PRESETS[config.model]
        cls = model_class(model_type, f"model preset {config.model!r}")  # before the config, which may need it
        tokenizer = local_tokenizer(words)
        model_config = architecture(len(tokenizer))
        tiny = config.model.startswith("tiny")
        processor = image_processor(image_side if tiny else None, model_type=model_type, model_config=model_config)
        set_special_ids(model_config, tokenizer)
        torch.manual_seed(config.seed)
        with torch.device(device):
            model = cls(model_config)
    elif Path(config.model).is_dir():
        from transformers import AutoTokenizer

        precision = torch.bfloat16 if uses_bf16(config.dtype, device) else torch.float32
        model, model_type = load_local(config.model, precision, f"model directory {config.model}")
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        processor = image_processor(source=config.model, model_type=model_type)
    else:
        raise ValueError(f"config: 'model' expected a preset {sorted(PRESETS)} or a local directory, "
                         f"got {config.model!r}")
    return model, tokenizer, processor


def build(config: TrainConfig, words: list[str], device: torch.device, image_side: int = 32):
    """(model, tokenizer, image processor) for training: ``backbone`` with PDF applied, DoRA on
    ``VLM2VEC_TARGETS`` when ``lora_r`` > 0. With ``--dtype bf16`` (the GPU default) the frozen weights end in
    bf16 and the trainable ones in fp32."""
    bf16 = uses_bf16(config.dtype, device)
    model, tokenizer, processor = backbone(config, words, device, image_side)
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


def make_collator(model, tokenizer, processor, max_length: int, image_side: int = 0):
    """The collator of the model's family; ``image_side`` > 0 resizes every image to that square first."""
    hf = models.patch.hf_model(model)
    # Qwen-VL: mm_token_type_ids where the forward models.encode calls takes them
    if family(hf.config.model_type, "the model for the collator").inputs == "qwen":
        forward = (models.patch.inner_model(model) or hf).forward
        collator = Qwen2VLCollator(tokenizer, processor, hf.config, max_length,
                                   token_types=takes_token_types(forward))
    else:
        collator = LlavaCollator(tokenizer, processor, model, max_length)
    collator.image_side = image_side
    return collator
