"""An independent reference for the patched attention: eager float64 attention with prefix p's keys/values
concatenated (un-rotated) in front of the token keys/values, visible to every query.

It shares nothing with ``models/attention.py``: the rotary embedding is the model file's own function,
the mask is built from the inputs' 2-D padding mask, and the softmax is written out.
"""

from __future__ import annotations

import copy
import sys
import types

import torch
from torch import nn

from pdfkernels.models.anatomy import attention_modules, decoder_stack, hf_model


def _qkv(attn: nn.Module, hidden):
    """Queries, keys and values ``[B, heads, L, D]`` before the rotary, as the module's own forward makes them."""
    b, length, _ = hidden.shape
    if hasattr(attn, "qkv_proj"):  # Phi-3-V: one fused projection, [q | k | v] along its output
        sizes = [attn.num_heads * attn.head_dim] + [attn.num_key_value_heads * attn.head_dim] * 2
        parts = attn.qkv_proj(hidden).split(sizes, dim=-1)
    else:
        parts = (attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden))
    q, k, v = (p.view(b, length, -1, attn.head_dim) for p in parts)
    if hasattr(attn, "q_norm"):  # Qwen3-VL: per-head RMSNorm before the rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    return (t.transpose(1, 2) for t in (q, k, v))


def _rotary(attn: nn.Module, q, k, cos, sin):
    source = sys.modules[type(attn).__module__]
    if cos.dim() == 4:  # Qwen2-VL's older multimodal rotary [3, B, L, D]
        rope = getattr(attn, "rope_scaling", None) or attn.rope_parameters  # the name changed in 5.0
        return source.apply_multimodal_rotary_pos_emb(q, k, cos, sin, rope["mrope_section"])
    return source.apply_rotary_pos_emb(q, k, cos, sin)


def _forward(self, hidden_states, position_embeddings=None, **kwargs):
    spec = self._reference
    b, length, _ = hidden_states.shape
    q, k, v = _qkv(self, hidden_states)
    if position_embeddings is None:  # Phi-3-V: the module's own rotary embedding, from the position ids
        position_embeddings = self.rotary_emb(v, kwargs["position_ids"], seq_len=length)
    q, k = _rotary(self, q, k, *position_embeddings)
    prefix = spec["prefix"][spec["layer"], spec["path"]]  # [2, Hkv, K, D]
    k = torch.cat([prefix[0].expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([prefix[1].expand(b, -1, -1, -1), v], dim=2)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    own = torch.ones(length, length, dtype=torch.bool).tril() & spec["padding"]()[:, None, None, :].bool()
    visible = torch.cat([torch.ones(b, 1, length, prefix.shape[2], dtype=torch.bool), own], dim=-1)
    scores = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5
    out = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v
    out = self.o_proj(out.transpose(1, 2).reshape(b, length, -1))
    return (out, None) if spec["outputs"] == 2 else (out, None, None)


def float64_oracle(model: nn.Module, prefix: torch.Tensor, path: int, padding, outputs: int) -> nn.Module:
    """A float64 copy of the unpatched ``model`` whose text attention concatenates ``prefix[:, path]``;
    ``padding()`` returns the ``[B, L]`` padding mask of the current inputs; ``outputs``: how many values its
    decoder layers unpack from the attention (what ``apply_pdf`` found for the patched model)."""
    reference = copy.deepcopy(model).double()
    for layer, attn in enumerate(attention_modules(decoder_stack(hf_model(reference)))):
        attn._reference = {"prefix": prefix.detach().double(), "layer": layer, "path": path, "padding": padding,
                           "outputs": outputs}
        attn.forward = types.MethodType(_forward, attn)
    return reference
