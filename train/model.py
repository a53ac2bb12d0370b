"""The backbone, tokenizer and image processor for training: a local directory or a built-in architecture."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from pdfkernels import models
from pdfkernels.models import presets

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


QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # one input layout: pixel patches, grids, vision start/end
# (min, max) pixels of the published Qwen/*-Instruct preprocessor_config.json files (Qwen3-VL's as recalled, not
# re-read here); transformers' own defaults are lower: Qwen2-VL's 1,003,520 would shrink a 1344 x 1344 image
_PIXELS = {"qwen2_vl": (3136, 12845056), "qwen2_5_vl": (3136, 12845056), "qwen3_vl": (65536, 16777216)}


def _processor_class(kind: str):
    """The image processor class of a backbone kind, preferring the PIL implementation (no torchvision); the
    three Qwen-VL families share Qwen2-VL's (their published preprocessor configs name it)."""
    base = "Qwen2VLImageProcessor" if kind in QWEN_KINDS else {"llava_next": "LlavaNextImageProcessor",
                                                               "llava": "CLIPImageProcessor"}[kind]
    return getattr(transformers, base + "Pil", None) or getattr(transformers, base)


def image_processor(side: int | None = None, source: str | None = None, kind: str = "qwen2_vl", config=None):
    """A local directory's processor, the tiny presets' (images of ``side`` pixels), or the defaults; a Qwen-VL
    processor cuts the patches the architecture ``config`` embeds (Qwen3-VL: 16 pixels, with its 0.5 mean/std)."""
    cls = _processor_class(kind)
    if source is not None:
        return cls.from_pretrained(source, local_files_only=True)
    if kind in QWEN_KINDS:
        if config is None:
            if side is not None:
                raise ValueError("image_processor: images of a given side need the architecture's config")
            return cls()
        vision = config.vision_config
        extra = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if kind == "qwen3_vl" else {}
        low, high = (side * side,) * 2 if side is not None else _PIXELS[kind]
        extra.update(min_pixels=low, max_pixels=high)
        return cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                   temporal_patch_size=vision.temporal_patch_size, **extra)
    vision = config.vision_config
    crop = {"height": vision.image_size, "width": vision.image_size}
    extra = {"image_grid_pinpoints": config.image_grid_pinpoints} if kind == "llava_next" else {}
    return cls(size={"shortest_edge": vision.image_size}, crop_size=crop, **extra)


def set_special_ids(config, tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids
    if getattr(config, "model_type", "") in QWEN_KINDS:
        config.image_token_id = ids("<|image_pad|>")
        config.video_token_id = ids("<|video_pad|>")
        config.vision_start_token_id = ids("<|vision_start|>")
        config.vision_end_token_id = ids("<|vision_end|>")
    else:
        config.image_token_id = ids("<|image_pad|>")
        if hasattr(config, "image_token_index"):
            config.image_token_index = ids("<|image_pad|>")
    config.pad_token_id = tokenizer.pad_token_id


# preset -> (model type, its architecture from models/presets.py: the one source of each backbone's numbers);
# random weights. The tiny ones take the locally built tokenizer's vocabulary, the real ones keep theirs.
PRESETS = {
    "tiny": ("qwen2_vl", lambda vocab: presets.tiny_qwen2vl(vocab_size=vocab)),
    "tiny-qwen2.5vl": ("qwen2_5_vl", lambda vocab: presets.tiny_qwen2_5vl(vocab_size=vocab)),
    "tiny-qwen3vl": ("qwen3_vl", lambda vocab: presets.tiny_qwen3vl(vocab_size=vocab)),
    "tiny-llava-next": ("llava_next", lambda vocab: presets.tiny_llava_next("mistral", vocab_size=vocab)),
    "qwen2vl-2b": ("qwen2_vl", lambda vocab: presets.qwen2vl_2b()),
    "qwen2vl-7b": ("qwen2_vl", lambda vocab: presets.qwen2vl_7b()),
    "qwen2.5vl-3b": ("qwen2_5_vl", lambda vocab: presets.qwen2_5vl_3b()),
    "qwen2.5vl-7b": ("qwen2_5_vl", lambda vocab: presets.qwen2_5vl_7b()),
    "qwen3vl-2b": ("qwen3_vl", lambda vocab: presets.qwen3vl_2b()),
    "llava-next-7b": ("llava_next", lambda vocab: presets.llava_next_7b()),
}
# model type -> (the transformers class that trains it, the first transformers release that has it)
CLASSES = {"qwen2_vl": ("Qwen2VLForConditionalGeneration", "4.45"),
           "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "4.49"),
           "qwen3_vl": ("Qwen3VLForConditionalGeneration", "4.57"),
           "llava_next": ("LlavaNextForConditionalGeneration", "4.39"),
           "llava": ("LlavaForConditionalGeneration", "4.36")}


def model_class(kind: str, what: str) -> type:
    """The installed transformers' class for model type ``kind``; a clear refusal where it has none."""
    if kind not in CLASSES:
        raise ValueError(f"config: {what} holds a {kind!r} model; supported: {sorted(CLASSES)}")
    name, since = CLASSES[kind]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"config: {what} needs transformers' {name} (transformers >= {since}); the installed "
                         f"transformers {transformers.__version__} has none")
    return cls


def backbone(config: TrainConfig, words: list[str], device: torch.device, image_side: int = 32):
    """(backbone, tokenizer, image processor) for ``config.model``, before PDF: a preset with random weights
    (the tokenizer built from ``words``; on ``device``, the meta device included) or a local directory loaded
    offline (in bf16 when training in bf16, so that a 7B backbone never exists in fp32)."""
    if config.model in PRESETS:
        kind, architecture = PRESETS[config.model]
        cls = model_class(kind, f"model preset {config.model!r}")  # before the config, which may need it too
        tokenizer = local_tokenizer(words)
        arch = architecture(len(tokenizer))
        tiny = config.model.startswith("tiny")
        processor = image_processor(image_side if tiny else None, kind=kind, config=arch)
        set_special_ids(arch, tokenizer)
        torch.manual_seed(config.seed)
        with torch.device(device):
            model = cls(arch)
    elif Path(config.model).is_dir():
        from transformers import AutoConfig, AutoTokenizer

        kind = AutoConfig.from_pretrained(config.model, local_files_only=True).model_type
        cls = model_class(kind, f"model directory {config.model}")
        tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        precision = torch.bfloat16 if uses_bf16(config.dtype, device) else torch.float32
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # 4.52's name
        model = cls.from_pretrained(config.model, local_files_only=True, **{dtype_arg: precision}).to(device)
        processor = image_processor(source=config.model, kind=kind)
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
    if hf.config.model_type in QWEN_KINDS:  # mm_token_type_ids where the forward models.encode calls takes them
        forward = (models.patch.inner_model(model) or hf).forward
        collator = Qwen2VLCollator(tokenizer, processor, hf.config, max_length,
                                   token_types=takes_token_types(forward))
    else:
        collator = LlavaCollator(tokenizer, processor, model, max_length)
    collator.image_side = image_side
    return collator
