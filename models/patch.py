"""Deep prefixes for N parallel paths in Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA(-Next) and Phi-3-V models, patched
in place.

``apply_pdf`` adds one parameter, ``model.pdf_prefix`` ``[layers, N, 2, Hkv, K, D]`` (an fp32 master copy
whatever the backbone's dtype; each layer reads it in its compute dtype), gives each text
attention module the PDF forward (``attention.py``; the vision tower is untouched) and proves with a dry
forward that the language model calls it. It takes Hugging Face's classes (transformers 4.52 to 5.x) and
VLM2Vec's vendored ones, bare, inside peft, or inside VLM2Vec's ``MMEBModel``. ``use_paths`` picks the
path(s) of the next forwards; ``encode`` returns last-token embeddings for several paths from one call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from pdfkernels import backend

from . import attention
from .anatomy import SUPPORTED, check_supported, hf_model, inner_model, text_config
from .mmeb import install_pooling, is_mmeb

__all__ = ["SUPPORTED", "apply_pdf", "encode", "hf_model", "inner_model", "last_token", "mark_pdf_trainable",
           "pdf_parameters", "text_config", "use_paths"]

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


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of what PDF adds to a backbone of ``dtype``: fp32 (float64 for float64 references). A bf16
    prefix cannot train: at |p| ~ 0.17 bf16's spacing is ~1e-3, far above an AdamW step at lr 2e-5, so most
    elements would never change."""
    return backend.accumulate_dtype(dtype)


def apply_pdf(model: nn.Module, num_paths: int = 2, prefix_len: int = 20, *, seed: int = 0) -> nn.Module:
    """Patch a model in place for PDF and return it.

    ``model``: a supported Hugging Face or VLM2Vec-vendored model, bare, peft-wrapped, or VLM2Vec's
    ``MMEBModel`` (its ``.encoder``). Adds ``pdf_prefix`` (``[num_layers, num_paths, 2, num_kv_heads,
    prefix_len, head_dim]``, index 0 keys, 1 values, on the language model's device) to the Hugging Face
    model, in fp32 whatever the backbone's dtype (``master_dtype``: the optimizer updates this master copy;
    the attention casts it to its compute dtype, under autocast too), gives every text attention module the
    PDF forward, selects path 0, and runs a
    two-token dry forward of the language model that must reach the PDF attention in every layer; if it does
    not, the model is left unpatched and ``RuntimeError`` says why. Given VLM2Vec's ``MMEBModel``, its
    instance also gets the k-path pooling of ``models/mmeb.py`` (several paths through ``encode_input``).
    """
    hf = hf_model(model)
    decoder = check_supported(hf)
    if isinstance(num_paths, bool) or not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"apply_pdf: argument 'num_paths' expected an int >= 1, got {num_paths!r}")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"apply_pdf: argument 'prefix_len' expected an int >= 0, got {prefix_len!r}")
    if hasattr(hf, "pdf_prefix"):
        raise RuntimeError("apply_pdf: this model is already patched")
    layers, kv_heads, head_dim = decoder.geometry
    reference = decoder.stack.embed_tokens.weight
    generator = torch.Generator().manual_seed(seed)
    hf.pdf_prefix = nn.Parameter(init_prefix(layers, num_paths, kv_heads, prefix_len, head_dim,
                                             master_dtype(reference.dtype), reference.device, generator))
    hf.pdf_state = attention.PDFState(hf.pdf_prefix)
    hf.pdf_num_paths, hf.pdf_prefix_len = num_paths, prefix_len
    bindings = attention.patch_decoder(decoder, hf.pdf_state)
    try:
        attention.prove_live(decoder, bindings)
    except RuntimeError:  # leave the model as it was, not half patched
        attention.unpatch_decoder(decoder)
        del hf.pdf_prefix, hf.pdf_state, hf.pdf_num_paths, hf.pdf_prefix_len
        raise
    if is_mmeb(model):
        install_pooling(model, hf.pdf_state)
    return model


def _state(model: nn.Module) -> attention.PDFState:
    hf = hf_model(model)
    if not hasattr(hf, "pdf_state"):
        raise RuntimeError("this model is not patched: call models.apply_pdf(model) first")
    return hf.pdf_state


def _normalise_paths(model: nn.Module, paths: int | Sequence[int] | None) -> tuple[int, ...]:
    """The paths as a tuple of ids; () for None (no prefix)."""
    if paths is None:
        return ()
    chosen = [paths] if isinstance(paths, int) else list(paths) if isinstance(paths, (list, tuple)) else None
    n = hf_model(model).pdf_num_paths
    if not chosen or any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n for p in chosen):
        raise ValueError(f"argument 'paths' expected an int, a non-empty list of ints in [0, {n}) or None, "
                         f"got {paths!r}")
    return tuple(chosen)


@contextlib.contextmanager
def use_paths(model: nn.Module, paths: int | Sequence[int] | None) -> Iterator[None]:
    """Run the model's next forwards on ``paths``: an int (one prefix), a list of k ints (the language model's
    input is repeated k times along the batch, path-major, so outputs have k·B rows: rows ``p·B + b`` are
    path ``paths[p]``; VLM2Vec's ``encode_input`` returns ``[k·B, d]`` so, left or right padded), or None (no prefix:
    the plain model). The vision tower and multimodal position ids see the original B inputs. Each forward
    keeps its paths for a gradient-checkpointing recompute, also one that runs after this block exits."""
    state = _state(model)
    chosen = _normalise_paths(model, paths)
    previous, state.paths = state.paths, chosen
    try:
        yield
    finally:
        state.paths = previous


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
    launch per layer for all paths), and the LM head (``[B, L, vocab]`` logits) is never computed, except on
    VLM2Vec's vendored models, whose only multimodal forward computes it."""
    k = max(1, len(_normalise_paths(model, paths)))
    inner = inner_model(model)
    with use_paths(model, paths):
        if inner is not None:
            hidden = inner(**inputs, use_cache=False, return_dict=True).last_hidden_state
        else:  # VLM2Vec's vendored models have no multimodal model without the LM head
            out = hf_model(model)(**inputs, use_cache=False, return_dict=True, output_hidden_states=True)
            hidden = out.hidden_states[-1]
    mask = inputs.get("attention_mask")
    if mask is not None and k > 1:
        mask = mask.repeat(k, 1)
    pooled = last_token(hidden, mask)
    return pooled.view(k, -1, pooled.shape[-1])


def pdf_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PDF adds to the backbone (the prefix)."""
    return [hf_model(model).pdf_prefix]


def mark_pdf_trainable(model: nn.Module) -> nn.Module:
    """Make the prefix trainable again, e.g. after peft froze every non-adapter weight."""
    for p in pdf_parameters(model):
        p.requires_grad_(True)
    return model
