"""Deep prefixes for N parallel paths in Hugging Face Qwen2-VL and LLaVA(-Next) models, patched in place.

``apply_pdf`` adds one parameter, ``model.pdf_prefix`` ``[layers, N, 2, Hkv, K, D]``, and points the
language model's attention at ``pdf_attention`` through transformers' attention interface; the vision
tower keeps its own implementation and no module is replaced. ``use_paths`` picks the path(s) of the next
forwards; ``encode`` returns last-token embeddings for several paths from one call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import attention

SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "LlavaNextForConditionalGeneration",
             "LlavaForConditionalGeneration")
_LLAVA_TEXT_MODELS = ("MistralModel", "LlamaModel")


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (or the model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base


def _inner(model: nn.Module) -> nn.Module:
    """The multimodal model without the LM head (``Qwen2VLModel``, ``LlavaModel``, ``LlavaNextModel``)."""
    hf = _hf_model(model)
    return hf if type(hf).__name__ == "Qwen2VLModel" else hf.model


def language_model(model: nn.Module) -> nn.Module:
    return _inner(model).language_model


def vision_tower(model: nn.Module) -> nn.Module:
    inner = _inner(model)
    return inner.visual if hasattr(inner, "visual") else inner.vision_tower


def _check_supported(hf: nn.Module) -> None:
    name = type(hf).__name__
    if name not in SUPPORTED:
        raise TypeError(f"apply_pdf: model type {name} is not supported; supported: {', '.join(SUPPORTED)} "
                        f"(LLaVA with a {' or '.join(_LLAVA_TEXT_MODELS)} language model)")
    if name.startswith("Llava"):
        text = type(hf.model.language_model).__name__
        if text not in _LLAVA_TEXT_MODELS:
            raise TypeError(f"apply_pdf: {name} with a {text} language model is not supported; supported language "
                            f"models: {', '.join(_LLAVA_TEXT_MODELS)}")


def _text_geometry(hf: nn.Module) -> tuple[int, int, int]:
    cfg = hf.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def init_prefix(num_layers: int, num_paths: int, kv_heads: int, prefix_len: int, head_dim: int,
                dtype: torch.dtype, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prefix keys and values drawn independently per path from N(0, 1/head_dim).

    Different draws per path make the paths differ from the first step (the paper initialises prefixes
    differently so that paths diverge). The scale keeps a prefix key's logit q·k/sqrt(D) at the size of a
    unit-variance key's times 1/sqrt(D): prefix tokens start with a small share of attention and values near
    zero, so the pretrained model's behaviour is barely disturbed at step 0."""
    shape = (num_layers, num_paths, 2, kv_heads, prefix_len, head_dim)
    values = torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(head_dim)
    return values.to(device=device, dtype=dtype)


def apply_pdf(model: nn.Module, num_paths: int = 2, prefix_len: int = 20, *, seed: int = 0) -> nn.Module:
    """Patch a Hugging Face model in place for PDF and return it.

    Adds ``model.pdf_prefix`` (``[num_layers, num_paths, 2, num_kv_heads, prefix_len, head_dim]``, index 0 keys,
    1 values, in the language model's dtype and device), sets the language model's attention implementation
    to ``"pdf_prefix"`` (attention and mask functions registered in transformers' interfaces), and selects
    path 0. Works on a peft-wrapped model too (the parameter goes on the wrapped Hugging Face model).
    """
    hf = _hf_model(model)
    _check_supported(hf)
    if not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"apply_pdf: argument 'num_paths' expected an int >= 1, got {num_paths!r}")
    if not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"apply_pdf: argument 'prefix_len' expected an int >= 0, got {prefix_len!r}")
    if hasattr(hf, "pdf_prefix"):
        raise RuntimeError("apply_pdf: this model is already patched")
    layers, kv_heads, head_dim = _text_geometry(hf)
    lm = language_model(hf)
    reference = next(lm.parameters())
    generator = torch.Generator().manual_seed(seed)
    hf.pdf_prefix = nn.Parameter(init_prefix(layers, num_paths, kv_heads, prefix_len, head_dim, reference.dtype,
                                             reference.device, generator))
    hf.pdf_state = attention.PDFState(hf.pdf_prefix)
    hf.pdf_num_paths, hf.pdf_prefix_len = num_paths, prefix_len
    for index, layer in enumerate(lm.layers):
        attention.bind(layer.self_attn, hf.pdf_state, index)
    attention.register()
    hf.set_attn_implementation({"text_config": attention.ATTENTION_NAME})
    if hf.config.text_config._attn_implementation != attention.ATTENTION_NAME:
        raise RuntimeError("apply_pdf: transformers did not accept the attention implementation for the text model")
    return model


def _state(model: nn.Module) -> attention.PDFState:
    hf = _hf_model(model)
    if not hasattr(hf, "pdf_state"):
        raise RuntimeError("this model is not patched: call models.apply_pdf(model) first")
    return hf.pdf_state


def _normalise_paths(model: nn.Module, paths: int | Sequence[int] | None) -> list[int] | None:
    if paths is None:
        return None
    chosen = [paths] if isinstance(paths, int) else list(paths)
    n = _hf_model(model).pdf_num_paths
    if not chosen or any(not isinstance(p, int) or not 0 <= p < n for p in chosen):
        raise ValueError(f"argument 'paths' expected an int, a non-empty list of ints in [0, {n}) or None, "
                         f"got {paths!r}")
    return chosen


def _repeat_batch(name: str, value, k: int, batch: int):
    """Repeat a language-model input k times along its batch dimension, path-major."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if name == "position_ids" and value.dim() == 3:  # Qwen2-VL multimodal rope ids [3 or 4, B, L]
        return value.repeat(1, k, 1)
    if value.shape[0] == batch:
        return value.repeat(k, *([1] * (value.dim() - 1)))
    return value


@contextlib.contextmanager
def use_paths(model: nn.Module, paths: int | Sequence[int] | None) -> Iterator[None]:
    """Run the model's next forwards on ``paths``: an int (one prefix), a list of k ints (the language model's
    input is repeated k times along the batch, path-major, so outputs have k·B rows), or None (no prefix:
    the plain model). The vision tower and multimodal position ids see the original B inputs."""
    _state(model)
    chosen = _normalise_paths(model, paths)
    k = 1 if chosen is None else len(chosen)

    def add_paths(module, args, kwargs):
        """Tag the language model's forward with the paths (they reach every attention call, and are kept by
        gradient checkpointing for the recompute) and, for k > 1 paths, repeat its inputs path-major."""
        if k > 1:
            embeds = kwargs.get("inputs_embeds")
            reference = embeds if embeds is not None else kwargs.get("input_ids")
            if reference is None:
                raise RuntimeError("use_paths: the language model got neither inputs_embeds nor input_ids")
            kwargs = {key: _repeat_batch(key, value, k, reference.shape[0]) for key, value in kwargs.items()}
        kwargs[attention.PATHS_KWARG] = () if chosen is None else tuple(chosen)
        return args, kwargs

    handle = language_model(model).register_forward_pre_hook(add_paths, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of the last real token per row, for left or right padding: ``[B, L, d]`` -> ``[B, d]``."""
    if attention_mask is None:
        return hidden[:, -1]
    mask = attention_mask.to(torch.bool)
    length = mask.shape[1]
    # last index whose mask is True (works for left, right or no padding)
    last = length - 1 - torch.flip(mask, dims=[1]).to(torch.int8).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def encode(model: nn.Module, inputs: dict, paths: int | Sequence[int] | None) -> torch.Tensor:
    """Embeddings ``[k, B, d]`` of the last real token for each of k paths (``paths``: int, list or None).

    One call: the vision tower runs once on the B inputs, the language model once on k·B rows (one attention
    launch per layer for all paths), and the LM head (``[B, L, vocab]`` logits) is never computed."""
    chosen = _normalise_paths(model, paths)
    k = 1 if chosen is None or len(chosen) == 1 else len(chosen)
    inner = _inner(model)
    with use_paths(model, paths):
        out = inner(**inputs, use_cache=False, return_dict=True)
    hidden = out.last_hidden_state
    mask = inputs.get("attention_mask")
    if mask is not None and k > 1:
        mask = mask.repeat(k, 1)
    pooled = last_token(hidden, mask)
    return pooled.view(k, -1, pooled.shape[-1])


def pdf_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PDF adds to the backbone (the prefix)."""
    return [_hf_model(model).pdf_prefix]


def mark_pdf_trainable(model: nn.Module) -> nn.Module:
    """Make the prefix trainable again, e.g. after peft froze every non-adapter weight."""
    for p in pdf_parameters(model):
        p.requires_grad_(True)
    return model
