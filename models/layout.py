"""Where the parts of a supported model are, whatever wraps it and however its code is laid out.

Handles Hugging Face's classes (transformers 4.52 to 5.x: text stack at ``model.model.language_model`` or
``model.language_model``) and VLM2Vec's vendored copies (Qwen2-VL: flat config, text stack at
``model.model``; LLaVA-NeXT: a causal LM at ``model.language_model`` whose stack is ``.model``), inside a
peft wrapper or VLM2Vec's ``MMEBModel`` (``.encoder``). The text decoder stack is found by what it is, not
by where it sits: the one submodule with ``embed_tokens``, ``layers`` and ``rotary_emb``.
"""

from __future__ import annotations

from torch import nn

SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "LlavaNextForConditionalGeneration",
             "LlavaForConditionalGeneration")
TEXT_STACKS = ("Qwen2VLModel", "Qwen2VLTextModel", "MistralModel", "LlamaModel")  # supported decoder stacks
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
             if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "rotary_emb")
             and hasattr(m, "embed_tokens")]
    if len(found) != 1:
        raise TypeError(f"apply_pdf: expected one text decoder stack (a module with embed_tokens, layers and "
                        f"rotary_emb) in {type(hf).__name__}, found {len(found)}")
    return found[0]


def check_supported(hf: nn.Module) -> nn.Module:
    """Refuse what is not a supported model, naming what is; return the decoder stack."""
    name = type(hf).__name__
    if name not in SUPPORTED:
        raise TypeError(f"apply_pdf: model type {name} is not supported; supported: {', '.join(SUPPORTED)} "
                        f"(LLaVA with a Mistral or Llama language model), also inside peft or VLM2Vec's MMEBModel")
    stack = decoder_stack(hf)
    if type(stack).__name__ not in TEXT_STACKS:
        raise TypeError(f"apply_pdf: {name} with a {type(stack).__name__} language model is not supported; "
                        f"supported text stacks: {', '.join(TEXT_STACKS)}")
    for index, layer in enumerate(stack.layers):
        attn = getattr(layer, "self_attn", None)
        missing = [p for p in (*_PROJECTIONS, "head_dim") if not hasattr(attn, p)]
        if missing:
            raise TypeError(f"apply_pdf: decoder layer {index} of {name} has no self_attn with {', '.join(missing)}")
    return stack


def attention_modules(stack: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in stack.layers]


def text_config(model: nn.Module):
    """The configuration the text layers were built from (a nested ``text_config`` or a flat config)."""
    return decoder_stack(hf_model(model)).config


def geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of the text decoder, read from the layers and the config they were built with."""
    stack = decoder_stack(hf_model(model))
    attn = stack.layers[0].self_attn
    return len(stack.layers), stack.config.num_key_value_heads, attn.head_dim


def inner_model(model: nn.Module) -> nn.Module | None:
    """The multimodal model without the LM head (``Qwen2VLModel``, ``LlavaModel``, ``LlavaNextModel``), or None
    where the code has none (VLM2Vec's vendored models: their ``.model`` / ``.language_model`` is text only)."""
    hf = hf_model(model)
    if type(hf).__name__ == "Qwen2VLModel" and hasattr(hf, "language_model"):
        return hf
    inner = getattr(hf, "model", None)
    if isinstance(inner, nn.Module) and (hasattr(inner, "visual") or hasattr(inner, "vision_tower")):
        return inner
    return None


def vision_tower(model: nn.Module) -> nn.Module:
    owner = inner_model(model) or hf_model(model)
    return owner.visual if hasattr(owner, "visual") else owner.vision_tower
