"""Our attention and mask functions, registered in transformers' interfaces under one name.

The language model's attention modules call ``pdf_attention`` through ``AttentionInterface``; the mask
function registered beside it (``AttentionMaskInterface``; without one, transformers silently drops the
padding mask) hands over the ``[B, L]`` key padding mask instead of materialising ``[B, 1, L, L]``. Which
prefix a row uses comes from the ``PDFState`` of the patched model, looked up per attention module in a
weak dictionary, so no module is replaced or modified.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from pdfkernels.prefix_attention import prefix_attention_known_paths

ATTENTION_NAME = "pdf_prefix"
PATHS_KWARG = "pdf_paths"  # the language model's forward kwarg carrying the active paths: a tuple, () = none


@dataclass
class PDFState:
    """The patched model's prefix parameter and the paths a forward outside ``use_paths`` runs (None: no prefix)."""

    prefix: torch.nn.Parameter  # [layers, N, 2, Hkv, K, D]
    paths: list[int] | None = field(default_factory=lambda: [0])



def path_ids_for(paths: list[int], batch: int, device: torch.device) -> torch.Tensor:
    """Path id per row; with k paths the batch is k copies of the inputs, path-major."""
    k = len(paths)
    if batch % k:
        raise ValueError(f"pdf attention: batch of {batch} rows is not a multiple of the {k} active paths "
                         f"{paths} (inputs are repeated path-major)")
    return torch.tensor(paths, device=device).repeat_interleave(batch // k)


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> (state, layer index)


def bind(module: torch.nn.Module, state: PDFState, layer: int) -> None:
    _STATES[module] = (state, layer)


def pdf_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]``, mask ``[B, L]``
    bool (from ``pdf_mask``) or None. Returns ``([B, L, H, D], None)``."""
    if module not in _STATES:
        raise RuntimeError("pdf attention: this attention module is not part of a model patched by "
                           "models.apply_pdf (set another attn_implementation on unpatched models)")
    state, layer = _STATES[module]
    if dropout and module.training:
        raise NotImplementedError("pdf attention: attention dropout is not supported (the model has "
                                  f"attention_dropout={dropout}); set it to 0")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("pdf attention: a key/value cache (incremental decoding) is not supported; "
                                  "call the model with use_cache=False")
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise NotImplementedError(f"pdf attention: sequence of {key.shape[2]} tokens exceeds the sliding window "
                                  f"({sliding_window}), which the prefix kernels do not implement")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise RuntimeError("pdf attention: expected the [B, L] key padding mask of the 'pdf_prefix' mask function; "
                           "set the model's attention implementation with models.apply_pdf")
    # the paths travel with the forward's kwargs (set by use_paths), so that a gradient-checkpointing
    # recompute in the backward sees the paths of its forward; outside use_paths, the state's default
    paths = kwargs.get(PATHS_KWARG, state.paths)
    if paths is None or len(paths) == 0:  # the plain model: no prefix keys
        prefix = state.prefix.new_zeros(1, key.shape[1], 0, key.shape[3]).to(query.dtype)
        prefix_k = prefix_v = prefix
        path_ids = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    else:
        layer_prefix = state.prefix[layer].to(query.dtype)  # [N, 2, Hkv, K, D]
        prefix_k, prefix_v = layer_prefix[:, 0], layer_prefix[:, 1]
        path_ids = path_ids_for(list(paths), query.shape[0], query.device)
    # path ids come from paths use_paths validated: skip the per-layer range check (a device sync)
    out = prefix_attention_known_paths(query, key, value, prefix_k, prefix_v, path_ids,
                                       key_padding_mask=attention_mask,
                                       causal=getattr(module, "is_causal", True), softmax_scale=scaling)
    return out.transpose(1, 2), None


def pdf_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The ``[B, L]`` bool key padding mask (None when nothing is padded). Refuses what the kernels cannot do:
    caches (offsets) and masks other than causal (checked by evaluating ``mask_function`` on the grid)."""
    if q_offset or kv_offset or q_length != kv_length:
        raise NotImplementedError("pdf attention: a key/value cache (incremental decoding) is not supported; "
                                  "call the model with use_cache=False")
    if mask_function is not None:
        device = kwargs.get("device", "cpu")
        q_idx = torch.arange(q_length, device=device)[:, None]
        kv_idx = torch.arange(kv_length, device=device)[None, :]
        batch_idx = torch.zeros((), dtype=torch.long, device=device)
        expected = kv_idx <= q_idx
        try:
            got = mask_function(batch_idx, batch_idx, q_idx, kv_idx)
        except Exception as exc:  # an overlay we cannot evaluate on index grids
            raise NotImplementedError(f"pdf attention: unsupported attention mask overlay ({exc})") from exc
        if not torch.equal(torch.as_tensor(got, device=device).expand_as(expected), expected):
            raise NotImplementedError("pdf attention: the model asks for a mask other than causal (a sliding window "
                                      "shorter than the sequence, packed sequences or an overlay), which the prefix "
                                      "kernels do not implement")
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    return None if bool(mask.all()) else mask


def register() -> None:
    """Register under ``ATTENTION_NAME`` in both interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, pdf_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, pdf_mask)
