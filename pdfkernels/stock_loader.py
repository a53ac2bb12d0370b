"""Load a model exported by ``python -m pdfkernels.export`` and embed with it, using only torch and transformers.

This file is copied into every export folder; it imports nothing of pdfkernels (nor Triton), so a serving
environment needs only ``pip install torch transformers``:

    import sys; sys.path.insert(0, "EXPORT")
    import stock_loader
    embedder = stock_loader.load("EXPORT")           # the backbone (LoRA/DoRA merged) and the path's prefix
    embeddings = embedder.embed(inputs)               # [B, d]: inputs as the backbone's processor makes them
    tokenizer = stock_loader.load_tokenizer("EXPORT")

How the prefix reaches a stock model: each layer's prefix keys and values go in front of the tokens' own as a
pre-filled key/value cache of K entries. The keys were trained without a rotary embedding, and a cache holds
keys after the rotary, so they enter it as stored. The tokens keep the positions the model gives them without a
cache (passed explicitly: with a cache the model would shift them by K; Qwen-VL's multimodal positions come
from the model's own ``get_rope_index``), and the attention mask gets K ones in front. The embedding is the
last real token's final hidden state (left or right padding), as pdfkernels' ``models.encode`` pools it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

FORMAT = "pdfkernels-prefix-cache"
VERSION = 1
EXPORT_FILE = "pdf_export.json"


@dataclass
class Embedder:
    """An exported backbone and its one path's prefix: ``keys`` and ``values`` ``[layers, kv_heads, K, head_dim]``."""

    model: torch.nn.Module
    keys: torch.Tensor
    values: torch.Tensor

    @torch.no_grad()
    def embed(self, inputs: dict) -> torch.Tensor:
        """Last-real-token embeddings ``[B, d]`` of one batch with the prefix in every layer."""
        return embed(self.model, self.keys, self.values, inputs)


def load(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa") -> Embedder:
    """The exported model (``from_pretrained`` of the class its config names) and its prefix, in ``dtype``."""
    folder = Path(folder)
    described = json.loads((folder / EXPORT_FILE).read_text())
    if described.get("format") != FORMAT or described.get("version") != VERSION:
        raise ValueError(f"{folder / EXPORT_FILE}: expected format {FORMAT!r} version {VERSION}, got "
                         f"{described.get('format')!r} version {described.get('version')!r}")
    cls = getattr(transformers, described["architecture"], None)
    if cls is None:
        raise ValueError(f"{folder}: transformers {transformers.__version__} has no {described['architecture']}")
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # 4.x's name
    model = cls.from_pretrained(folder, local_files_only=True, attn_implementation=attn_implementation,
                                **{dtype_arg: dtype}).to(device).eval()
    prefix = load_file(str(folder / described["prefix_file"]))
    keys, values = (prefix[name].to(device=device, dtype=dtype) for name in ("keys", "values"))
    expected = (described["num_layers"], described["num_kv_heads"], described["prefix_len"], described["head_dim"])
    if tuple(keys.shape) != expected or tuple(values.shape) != expected:
        raise ValueError(f"{folder}: prefix keys {tuple(keys.shape)} / values {tuple(values.shape)}, expected "
                         f"{expected} (layers, kv_heads, prefix_len, head_dim)")
    return Embedder(model, keys, values)


def load_tokenizer(folder: str):
    """The export's tokenizer as the class its ``tokenizer_config.json`` names (transformers 4.5x's AutoTokenizer
    would pick the backbone's tokenizer class from config.json instead: wrong for the trainer's local one)."""
    config = Path(folder) / "tokenizer_config.json"
    named = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    # 4.5x writes a fast tokenizer's class without its "Fast" (from_pretrained adds it back), 5.x its own name
    cls = next((getattr(transformers, n) for n in (f"{named}Fast", named) if named and hasattr(transformers, n)), None)
    return (cls or transformers.AutoTokenizer).from_pretrained(folder, local_files_only=True)


def multimodal_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (``Qwen2VLModel``, ``LlavaModel``, ...): what ``embed`` calls."""
    return model.model if hasattr(model, "lm_head") else model


def _accepted(function, arguments: dict) -> dict:
    names = inspect.signature(function).parameters
    return {k: v for k, v in arguments.items() if k in names}


def positions(inner: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The position ids the model gives these inputs without a cache.

    Qwen-VL: transformers 5.x computes multimodal positions only when the batch has images or videos (else
    ``arange``), 4.5x calls ``get_rope_index`` for every first forward (text-only rows then count real tokens
    only). Both run here on a cleared ``rope_deltas`` (the model's memory of an earlier call) and leave it
    cleared. Other models: ``arange(L)`` on every row, whatever the padding."""
    ids = inputs["input_ids"]
    batch, length = ids.shape
    plain = torch.arange(length, device=ids.device).unsqueeze(0).expand(batch, length)
    if not hasattr(inner, "get_rope_index"):
        return plain
    known = {"input_ids": ids, "inputs_embeds": None, "attention_mask": inputs.get("attention_mask"), "cache": None,
             "past_key_values": None,
             **{k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                                            "mm_token_type_ids")}}
    inner.rope_deltas = None
    try:
        if hasattr(inner, "compute_3d_position_ids"):  # transformers 5.x
            found = inner.compute_3d_position_ids(**_accepted(inner.compute_3d_position_ids, known))
        else:  # 4.5x
            found = inner.get_rope_index(**_accepted(inner.get_rope_index, known))[0]
    finally:
        inner.rope_deltas = None
    return plain if found is None else found


def prefix_cache(keys: torch.Tensor, values: torch.Tensor, batch: int):
    """A ``DynamicCache`` holding every layer's K prefix entries for ``batch`` rows (they are the same rows)."""
    cache = transformers.DynamicCache()
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].expand(batch, -1, -1, -1), values[layer].expand(batch, -1, -1, -1), layer)
    return cache


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The last real token's hidden state per row (left, right or no padding): ``[B, L, d]`` -> ``[B, d]``."""
    if attention_mask is None:
        return hidden[:, -1]
    length = attention_mask.shape[1]
    last = length - 1 - torch.flip(attention_mask.bool(), dims=[1]).to(torch.int8).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@torch.no_grad()
def embed(model: torch.nn.Module, keys: torch.Tensor, values: torch.Tensor, inputs: dict) -> torch.Tensor:
    """``[B, d]`` embeddings of ``inputs`` (the processor's batch: ``input_ids``, ``attention_mask``, pixels...)
    with the prefix ``keys``/``values`` ``[layers, kv_heads, K, head_dim]`` in front of every layer's cache."""
    inner = multimodal_model(model)
    ids = inputs["input_ids"]
    batch, length = ids.shape
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=ids.device)
    call = {**inputs, "position_ids": positions(inner, {**inputs, "attention_mask": mask})}
    prefix_len = keys.shape[2]
    if prefix_len:
        cache_name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        call[cache_name] = prefix_cache(keys, values, batch)
        call["attention_mask"] = torch.cat([mask.new_ones(batch, prefix_len), mask], dim=1)
    hidden = inner(**call, use_cache=bool(prefix_len), return_dict=True).last_hidden_state
    return last_token(hidden, mask)
