"""Where the parts of a supported model are, whatever wraps it and however its code is laid out.

Handles Hugging Face's classes (transformers 4.52 to 5.x: text stack at ``model.model.language_model`` or
``model.language_model``) and VLM2Vec's vendored copies (Qwen2-VL / Qwen2.5-VL: flat config, text stack at
``model.model``; LLaVA-NeXT: a causal LM at ``model.language_model`` whose stack is ``.model``; Phi-3-V: the
stack ``model.model`` embeds the images itself and each attention module owns its rotary embedding), inside a
peft wrapper or VLM2Vec's ``MMEBModel`` (``.encoder``). The text decoder stack is found by what it is, not
by where it sits: the one submodule with ``embed_tokens`` and ``layers`` and a rotary embedding (its own, or
its attention modules').
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .families import SUPPORTED, TEXT_STACKS, AttentionForm


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face (or vendored) model inside VLM2Vec's ``MMEBModel`` and/or a peft wrapper."""
    if not hasattr(model, "config") or not hasattr(model, "forward"):
        raise TypeError(f"expected a model, got {type(model).__name__}")
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and hasattr(model, "encode_input"):  # VLM2Vec's MMEBModel
        model = encoder
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def decoder_stack(hf: nn.Module) -> nn.Module:
    """The text decoder stack (the module that owns the decoder layers and the rotary embedding)."""
    found = [m for _, m in hf.named_modules()
             if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "embed_tokens")
             and (hasattr(m, "rotary_emb") or _attention_owns_rotary(m))]
    if len(found) != 1:
        raise TypeError(f"apply_pdf: expected one text decoder stack (a module with embed_tokens, layers and "
                        f"rotary_emb) in {type(hf).__name__}, found {len(found)}")
    return found[0]


def _attention_owns_rotary(stack: nn.Module) -> bool:
    return len(stack.layers) > 0 and hasattr(getattr(stack.layers[0], "self_attn", None), "rotary_emb")


def attention_form(stack: nn.Module) -> AttentionForm:
    """How the attention of this (supported) decoder stack projects and rotates its queries and keys."""
    return TEXT_STACKS[type(stack).__name__]


@dataclass(frozen=True)
class Decoder:
    """A supported model's text decoder, found once: the stack, its attention form, its attention modules and
    its geometry (what ``apply_pdf`` and the patch need, passed down rather than looked up again)."""

    stack: nn.Module
    form: AttentionForm
    attentions: tuple[nn.Module, ...]
    num_kv_heads: int
    head_dim: int

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(layers, KV heads, head_dim)."""
        return len(self.attentions), self.num_kv_heads, self.head_dim


def check_supported(hf: nn.Module) -> Decoder:
    """Refuse what is not a supported model, naming what is; return its text decoder."""
    name = type(hf).__name__
    if name not in SUPPORTED:
        raise TypeError(f"apply_pdf: model type {name} is not supported; supported: {', '.join(SUPPORTED)} "
                        f"(LLaVA with a Mistral or Llama language model; Phi3VForCausalLM: VLM2Vec's vendored "
                        "Phi-3-V), also inside peft or VLM2Vec's MMEBModel")
    stack = decoder_stack(hf)
    if type(stack).__name__ not in TEXT_STACKS:
        raise TypeError(f"apply_pdf: {name} with a {type(stack).__name__} language model is not supported; "
                        f"supported text stacks: {', '.join(TEXT_STACKS)}")
    form = attention_form(stack)
    needed = form.projections + (("rotary_emb",) if form.own_rotary else ())
    for index, layer in enumerate(stack.layers):
        attn = getattr(layer, "self_attn", None)
        missing = [p for p in (*needed, "head_dim") if not hasattr(attn, p)]
        if missing:
            raise TypeError(f"apply_pdf: decoder layer {index} of {name} has no self_attn with {', '.join(missing)}")
    attentions = tuple(attention_modules(stack))
    return Decoder(stack, form, attentions, stack.config.num_key_value_heads, attentions[0].head_dim)


def attention_modules(stack: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in stack.layers]


def text_config(model: nn.Module):
    """The configuration the text layers were built from (a nested ``text_config`` or a flat config)."""
    return decoder_stack(hf_model(model)).config


def geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of the text decoder, read from the layers and the config they were built with."""
    stack = decoder_stack(hf_model(model))
    return len(stack.layers), stack.config.num_key_value_heads, stack.layers[0].self_attn.head_dim


def inner_model(model: nn.Module) -> nn.Module | None:
    """The multimodal model without the LM head (``Qwen2VLModel``, ``Qwen2_5_VLModel``, ``Qwen3VLModel``,
    ``LlavaModel``, ``LlavaNextModel``, Phi-3-V's ``Phi3VModel``), or None where the code has none (VLM2Vec's
    vendored Qwen2-VL / Qwen2.5-VL / LLaVA-NeXT: their ``.model`` / ``.language_model`` is text only)."""
    hf = hf_model(model)
    if hasattr(hf, "language_model") and hasattr(hf, "visual") and not hasattr(hf, "lm_head"):
        return hf  # already the inner model (Qwen*VLModel; 4.52's ForConditionalGeneration has both as properties)
    inner = getattr(hf, "model", None)
    if isinstance(inner, nn.Module) and any(hasattr(inner, n) for n in _VISION_NAMES):
        return inner
    return None


_VISION_NAMES = ("visual", "vision_tower", "vision_embed_tokens")  # Qwen, LLaVA, Phi-3-V


def vision_tower(model: nn.Module) -> nn.Module:
    owner = inner_model(model) or hf_model(model)
    return getattr(owner, next(n for n in _VISION_NAMES if hasattr(owner, n)))
