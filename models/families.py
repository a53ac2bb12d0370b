"""Every supported model family in one table, keyed by its config's ``model_type``: the classes ``apply_pdf`` takes,
its attention form, the stock class the trainer builds and export loads, its collator's input layout, its image
processor and limits, and its named presets. Adding a family is one entry here.

Words: a *model type* is the config's ``model_type`` string (``"qwen2_vl"``); a *family* is its entry below; a
*preset* is a name ``--model`` takes (``"tiny"``, ``"qwen2vl-2b"``), built from an architecture in
``architectures.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttentionForm:
    """How one family's text attention computes its queries, keys and values (the rest of the PDF forward is
    shared): ``fused_qkv``: one ``qkv_proj`` split into q, k, v (Phi-3-V) instead of q/k/v_proj; ``qk_norm``:
    per-head ``q_norm`` / ``k_norm`` before the rotary (Qwen3-VL); ``own_rotary``: each attention module computes
    cos/sin from ``position_ids`` with its own ``rotary_emb`` (Phi-3-V) instead of receiving the stack's
    ``position_embeddings``; ``embeds_images``: the stack's forward embeds ``input_ids`` (and images) itself and
    ignores ``inputs_embeds`` (Phi-3-V)."""

    fused_qkv: bool = False
    qk_norm: bool = False
    own_rotary: bool = False
    embeds_images: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        extra = ("q_norm", "k_norm") if self.qk_norm else ()
        return (("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")) + ("o_proj", *extra)


PLAIN = AttentionForm()
Architecture = Callable[[int], Any]  # the tokenizer's vocabulary size -> a Hugging Face config (random weights)


def _architecture(name: str, *args: Any, tiny: bool = False) -> Architecture:
    """``architectures.<name>(*args)``, imported on use (transformers is not loaded with the models package); a
    tiny one takes the locally built tokenizer's vocabulary, a real one keeps its own."""
    def build(vocab: int):
        from . import architectures

        return getattr(architectures, name)(*args, **({"vocab_size": vocab} if tiny else {}))

    return build


@dataclass(frozen=True)
class Family:
    model_type: str
    title: str
    classes: tuple[str, ...]  # the top-level classes apply_pdf takes: Hugging Face's and VLM2Vec's vendored ones
    text_stacks: dict[str, AttentionForm]  # its decoder stacks' class names -> how their attention computes q, k, v
    stock_class: str | None = None  # the transformers class the trainer builds and export loads; None: remote code
    since: str = ""  # the first transformers release that has ``stock_class``
    inner_class: str | None = None  # the model without the LM head (its forward may take mm_token_type_ids)
    inputs: str | None = "qwen"  # the collator's layout: "qwen" (patches, grids, vision start/end) or "llava"
    processor: str | None = None  # the image processor class (its PIL variant preferred: no torchvision)
    # (min, max) pixels of the published Qwen/*-Instruct preprocessor_config.json (transformers' own defaults are
    # lower: Qwen2-VL's 1,003,520 would shrink a 1344 x 1344 image)
    pixels: tuple[int, int] | None = None
    image_mean_std: float | None = None  # one mean and std for all channels where the processor's default is wrong
    video: bool = False  # video rows (Qwen2.5-VL needs second_per_grid_ts, Qwen3-VL timestamps: not built)
    presets: dict[str, Architecture] = field(default_factory=dict)


_QWEN_PROCESSOR = "Qwen2VLImageProcessor"  # the three Qwen-VL families' published preprocessor configs name it
_LLAMA_LIKE = {"MistralModel": PLAIN, "LlamaModel": PLAIN}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2-VL", ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
           {"Qwen2VLModel": PLAIN, "Qwen2VLTextModel": PLAIN}, "Qwen2VLForConditionalGeneration", "4.45",
           "Qwen2VLModel", "qwen", _QWEN_PROCESSOR, (3136, 12845056), video=True,
           presets={"tiny": _architecture("tiny_qwen2vl", tiny=True),
                    "qwen2vl-2b": _architecture("qwen2vl_2b"),
                    "qwen2vl-7b": _architecture("qwen2vl_7b")}),
    Family("qwen2_5_vl", "Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
           {"Qwen2_5_VLModel": PLAIN, "Qwen2_5_VLTextModel": PLAIN}, "Qwen2_5_VLForConditionalGeneration", "4.49",
           "Qwen2_5_VLModel", "qwen", _QWEN_PROCESSOR, (3136, 12845056),
           presets={"tiny-qwen2.5vl": _architecture("tiny_qwen2_5vl", tiny=True),
                    "qwen2.5vl-3b": _architecture("qwen2_5vl_3b"),
                    "qwen2.5vl-7b": _architecture("qwen2_5vl_7b")}),
    # Qwen3-VL's pixel limits as recalled, not re-read here; its processor normalises with mean = std = 0.5
    Family("qwen3_vl", "Qwen3-VL", ("Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
           {"Qwen3VLTextModel": AttentionForm(qk_norm=True)}, "Qwen3VLForConditionalGeneration", "4.57",
           "Qwen3VLModel", "qwen", _QWEN_PROCESSOR, (65536, 16777216), image_mean_std=0.5,
           presets={"tiny-qwen3vl": _architecture("tiny_qwen3vl", tiny=True),
                    "qwen3vl-2b": _architecture("qwen3vl_2b")}),
    Family("llava_next", "LLaVA-NeXT (1.6)", ("LlavaNextForConditionalGeneration",), _LLAMA_LIKE,
           "LlavaNextForConditionalGeneration", "4.39", "LlavaNextModel", "llava", "LlavaNextImageProcessor",
           presets={"tiny-llava-next": _architecture("tiny_llava_next", "mistral", tiny=True),
                    "llava-next-7b": _architecture("llava_next_7b")}),
    Family("llava", "LLaVA-1.5", ("LlavaForConditionalGeneration",), _LLAMA_LIKE,
           "LlavaForConditionalGeneration", "4.36", "LlavaModel", "llava", "CLIPImageProcessor"),
    # VLM2Vec's vendored Phi-3-V (remote code only: neither the lean trainer nor export can build it)
    Family("phi3_v", "Phi-3-V", ("Phi3VForCausalLM",),
           {"Phi3VModel": AttentionForm(fused_qkv=True, own_rotary=True, embeds_images=True)}, inputs=None),
)}

# derived views (never edited by hand)
SUPPORTED = tuple(name for f in FAMILIES.values() for name in f.classes)
TEXT_STACKS = {name: form for f in FAMILIES.values() for name, form in f.text_stacks.items()}
PRESETS = {name: (f.model_type, build) for f in FAMILIES.values() for name, build in f.presets.items()}
TRAINABLE = tuple(t for t, f in FAMILIES.items() if f.stock_class)  # what the lean trainer and export take


def family(model_type: str, what: str) -> Family:
    """The entry of a model type the lean trainer and export take; a clear refusal naming ``what`` holds it."""
    found = FAMILIES.get(model_type)
    if found is None or found.stock_class is None:
        raise ValueError(f"config: {what} holds a {model_type!r} model; supported: {sorted(TRAINABLE)}")
    return found


def model_class(model_type: str, what: str) -> type:
    """The installed transformers' class for ``model_type``; a clear refusal where it has none."""
    import transformers

    entry = family(model_type, what)
    cls = getattr(transformers, entry.stock_class, None)
    if cls is None:
        raise ValueError(f"config: {what} needs transformers' {entry.stock_class} (transformers >= {entry.since}); "
                         f"the installed transformers {transformers.__version__} has none")
    return cls


def load_local(folder: str, dtype, what: str) -> tuple[Any, str]:
    """(model, model type) from a local Hugging Face folder, offline, in ``dtype``, with its family's stock class."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = model_class(config.model_type, what)
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # 4.52's name
    return cls.from_pretrained(folder, local_files_only=True, **{dtype_arg: dtype}), config.model_type
