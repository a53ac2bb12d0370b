"""The PDF forward given to each text attention module of a patched model, and how the paths reach it.

One code path for every supported transformers release and for VLM2Vec's vendored models: each text
attention module keeps its own projections (peft LoRA/DoRA included) and gets an instance ``forward`` that
applies the rotary embedding it is handed and calls ``prefix_attention``. Nothing goes through transformers'
attention registries, which older releases and vendored per-class dispatch never consult.

**Paths** never travel as a keyword (older models reject unknown keywords). A forward hook on the decoder
stack's rotary embedding builds the forward's path-id tensor once, on the device, and returns the position
embeddings as ``(cos, sin, (path_ids, with_prefix))``; every layer receives that same tuple (decoder layers hand
it to their attention untouched), and gradient checkpointing (reentrant or not) replays the layer with it, so a
recompute in a backward that runs after ``use_paths`` has exited still uses the paths of its own forward. This is
plain tensors in a tuple, which ``torch.compile`` traces (the hook included) without a graph break. Where each
attention module computes its own rotary embedding from ``position_ids`` (Phi-3-V), a forward pre-hook on the
stack hands it fresh position ids whose *storage* carries the path ids instead (the storage, not the tensor:
reentrant checkpointing replays a layer on detached copies of its tensor arguments, which share the storage);
that mechanism is eager only (Dynamo cannot trace an attribute on a storage).

What differs between families is only how q, k and v are computed (``_project``, chosen by the stack's
``families.AttentionForm``): separate or fused projections, per-head q/k norms, the stack's or the module's rotary.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from pdfkernels.prefix_attention import prefix_attention_known_paths

from .anatomy import Decoder
from .families import AttentionForm
from .masks import key_padding_mask

PATHS_ATTR = "_pdf_paths"  # Phi-3-V: on the storage of the position ids a forward hands its layers


@dataclass
class PDFState:
    """The patched model's prefix and the paths of its next forwards: a tuple of ids, () = no prefix."""

    prefix: nn.Parameter  # [layers, N, 2, Hkv, K, D]
    paths: tuple[int, ...] = (0,)


@dataclass
class Binding:
    """What one attention module's PDF forward needs besides its own weights."""

    state: PDFState
    layer: int
    signature: inspect.Signature  # the original forward's, to read arguments passed by position or keyword
    outputs: int  # values the decoder layer unpacks: 3 for older per-class attention (with a cache), else 2
    mrope_section: list[int] | None  # Qwen2-VL before 4.53 hands the attention unmerged [3, B, L, D] rotary
    form: AttentionForm = field(default_factory=AttentionForm)
    calls: int = field(default=0)


def path_ids_for(paths: tuple[int, ...], batch: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The forward's path id per row (int64 ``[batch]``, made on ``device`` by fills: no host-to-device copy)
    and whether the prefix is used (``paths`` empty: the plain model, ids all 0 and unread). With k paths the
    batch is k copies of the inputs, path-major."""
    if not paths:
        return torch.zeros(batch, dtype=torch.long, device=device), False
    k = len(paths)
    if batch % k:
        raise ValueError(f"pdf attention: batch of {batch} rows is not a multiple of the {k} active paths "
                         f"{paths} (inputs are repeated path-major)")
    return torch.cat([torch.full((batch // k,), p, dtype=torch.long, device=device) for p in paths]), True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(cos: torch.Tensor, sin: torch.Tensor, mrope_section) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as ``[B, 1, L, D]``; Qwen2-VL's older ``[3, B, L, D]`` take their sections from temporal, height
    and width in turn."""
    if cos.dim() == 4:
        if mrope_section is None:
            raise RuntimeError("pdf attention: got multimodal rotary embeddings [3, B, L, D] but the config has no "
                               "mrope_section")
        sections = list(mrope_section) * 2
        cos, sin = (torch.cat([part[i % 3] for i, part in enumerate(t.split(sections, dim=-1))], dim=-1)
                    for t in (cos, sin))
    return cos.unsqueeze(1), sin.unsqueeze(1)


def _sliding_window(module: nn.Module) -> int | None:
    if hasattr(module, "sliding_window"):  # transformers 5.x sets it per layer (None for full attention)
        return module.sliding_window
    config = module.config
    return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None


def _arguments(signature: inspect.Signature, args, kwargs) -> dict:
    bound = dict(signature.bind(*args, **kwargs).arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return bound


def _paths_of(call: dict, form: AttentionForm) -> tuple[torch.Tensor, bool]:
    """The path ids of the forward this call belongs to and whether it uses the prefix, from what the stack
    handed every layer."""
    if form.own_rotary:
        positions = call.get("position_ids")
        paths = None if positions is None else getattr(positions.untyped_storage(), PATHS_ATTR, None)
        if paths is None:
            raise RuntimeError("pdf attention: these position ids were not handed over by the patched model's "
                               "decoder stack (call the model or its language model, not a layer on its own)")
        return paths
    position_embeddings = call.get("position_embeddings")
    if position_embeddings is None:
        raise RuntimeError("pdf attention: the decoder layer passed no position_embeddings")
    if len(position_embeddings) != 3:
        raise RuntimeError("pdf attention: these position embeddings were not made by the patched model's rotary "
                           "embedding (call the model or its language model, not a layer on its own)")
    return position_embeddings[2]


def _project(self: nn.Module, binding: Binding, hidden: torch.Tensor, call: dict):
    """Rotated queries and keys, and values, ``[B, heads, L, D]``, computed as this family's attention does."""
    batch, length, _ = hidden.shape
    head_dim, form = self.head_dim, binding.form
    if form.fused_qkv:  # Phi-3-V: [q | k | v] from one projection
        q_width, kv_width = self.num_heads * head_dim, self.num_key_value_heads * head_dim
        query, key, value = self.qkv_proj(hidden).split([q_width, kv_width, kv_width], dim=-1)
    else:
        query, key, value = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
    query, key, value = (t.view(batch, length, -1, head_dim) for t in (query, key, value))
    if form.qk_norm:  # Qwen3-VL: RMSNorm over each head's channels, before the rotary
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    if form.own_rotary:  # the module's own rotary embedding, from the position ids, as its forward calls it
        cos, sin = self.rotary_emb(value, call["position_ids"], seq_len=length)
    else:
        cos, sin = call["position_embeddings"][:2]
    cos, sin = _rotary(cos, sin, binding.mrope_section)
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin, value


def pdf_forward(self: nn.Module, *args, **kwargs):
    """The attention module's forward with the active path's prefix keys/values in front of its own."""
    binding: Binding = self._pdf
    call = _arguments(binding.signature, args, kwargs)
    hidden = call[next(iter(binding.signature.parameters))]  # the first parameter in every version
    path_ids, with_prefix = _paths_of(call, binding.form)
    if getattr(self, "attention_dropout", 0.0) and self.training:
        raise NotImplementedError("pdf attention: attention dropout is not supported (the model has "
                                  f"attention_dropout={self.attention_dropout}); set it to 0")
    if not getattr(self, "is_causal", True):
        raise NotImplementedError("pdf attention: only causal text attention is supported")
    batch, length, _ = hidden.shape
    window = _sliding_window(self)
    if window is not None and length > window:
        raise NotImplementedError(f"pdf attention: sequence of {length} tokens exceeds the sliding window "
                                  f"({window}), which the prefix kernels do not implement")
    head_dim = self.head_dim
    query, key, value = _project(self, binding, hidden, call)
    # under autocast the projections are half precision while cos/sin may be float32: one dtype for the kernel
    query, key = query.to(value.dtype), key.to(value.dtype)
    cache = next((call[n] for n in ("cache", "past_key_values", "past_key_value") if call.get(n) is not None), None)
    if cache is not None:  # allowed only as an empty cache filled once (a full forward with use_cache=True)
        if cache.get_seq_length(self.layer_idx) > 0:
            raise NotImplementedError("pdf attention: a key/value cache (incremental decoding) is not supported; "
                                      "call the model with use_cache=False")
        cache.update(key, value, self.layer_idx)
    padding = key_padding_mask(call.get("attention_mask"), batch, length)
    if with_prefix:
        layer_prefix = binding.state.prefix[binding.layer].to(query.dtype)  # [N, 2, Hkv, K, D]
        prefix_k, prefix_v = layer_prefix[:, 0], layer_prefix[:, 1]
    else:  # the plain model: no prefix keys
        prefix_k = prefix_v = query.new_zeros(1, key.shape[1], 0, head_dim)
    # path ids come from paths use_paths validated: skip the per-layer range check (a device sync)
    out = prefix_attention_known_paths(query, key, value, prefix_k, prefix_v, path_ids, key_padding_mask=padding,
                                       causal=True, softmax_scale=getattr(self, "scaling", None))
    out = self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    if not torch.compiler.is_compiling():  # a counter for prove_live; under compile it would guard every layer
        binding.calls += 1
    return (out, None) if binding.outputs == 2 else (out, None, cache)


def _hidden_of(args, kwargs) -> torch.Tensor:
    """The hidden states a rotary embedding is called with (``rotary(x, position_ids)``, by position or name)."""
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() == 3)


def _add_paths(rotary: nn.Module, args, kwargs, output):
    """Forward hook on the rotary embedding: ``(cos, sin, (path_ids, with_prefix))`` for this forward's batch."""
    cos, sin = output
    hidden = _hidden_of(args, kwargs)
    return cos, sin, path_ids_for(rotary._pdf_state.paths, hidden.shape[0], hidden.device)


def _repeat_batch(name: str, value, k: int, batch: int):
    """Repeat a language-model input k times along its batch dimension, path-major."""
    if name == "deepstack_visual_embeds" and value is not None:  # Qwen3-VL: per layer, the visual tokens' rows
        return [v.repeat(k, 1) for v in value]  # in row-major order of the (repeated) visual_pos_masks
    if isinstance(value, list) and len(value) == batch:  # one entry per row (Phi-3-V's pixel_values, image_sizes)
        return value * k
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if name == "position_ids" and value.dim() == 3:  # Qwen2-VL multimodal rope ids [3 or 4, B, L]
        return value.repeat(1, k, 1)
    if value.shape[0] == batch:
        return value.repeat(k, *([1] * (value.dim() - 1)))
    return value


def _repeat_for_paths(stack: nn.Module, args, kwargs):
    """Forward pre-hook on the decoder stack: with k > 1 active paths, its inputs are repeated k times."""
    k = len(stack._pdf_state.paths)
    if k <= 1:
        return None
    if args:
        raise RuntimeError("use_paths with several paths needs the language model called with keyword arguments")
    reference = kwargs.get("inputs_embeds")
    reference = reference if reference is not None else kwargs.get("input_ids")
    if reference is None:
        raise RuntimeError("use_paths: the language model got neither inputs_embeds nor input_ids")
    return args, {key: _repeat_batch(key, value, k, reference.shape[0]) for key, value in kwargs.items()}


def _tag_position_ids(stack: nn.Module, args, kwargs):
    """Forward pre-hook on a stack whose attention modules compute their own rotary (Phi-3-V): fresh position
    ids (the stack's default, ``arange(L)``, when none are given) whose storage carries this forward's
    ``(path_ids, with_prefix)``."""
    if args:
        raise RuntimeError("pdf attention: this language model must be called with keyword arguments")
    reference = kwargs.get("input_ids")
    reference = reference if reference is not None else kwargs.get("inputs_embeds")
    if reference is None:
        raise RuntimeError("pdf attention: the language model got neither input_ids nor inputs_embeds")
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(reference.shape[1], device=reference.device).unsqueeze(0)
    else:
        positions = positions.clone()  # a storage of its own: the caller may reuse its tensor with other paths
    paths = path_ids_for(stack._pdf_state.paths, reference.shape[0], reference.device)
    setattr(positions.untyped_storage(), PATHS_ATTR, paths)
    return args, {**kwargs, "position_ids": positions}


def _mrope_section(attn: nn.Module, config) -> list[int] | None:
    for rope in (getattr(attn, "rope_scaling", None), getattr(config, "rope_scaling", None),
                 getattr(config, "rope_parameters", None)):
        if isinstance(rope, dict) and rope.get("mrope_section"):
            return list(rope["mrope_section"])
    return None


def patch_decoder(decoder: Decoder, state: PDFState) -> list[Binding]:
    """Give each attention module the PDF forward and hook the stack; returns the bindings (their call counts)."""
    stack, form = decoder.stack, decoder.form
    stack._pdf_state = state
    repeat = stack.register_forward_pre_hook(_repeat_for_paths, with_kwargs=True)
    if form.own_rotary:  # registered after the repetition: it tags the repeated inputs' positions
        stack._pdf_hooks = (repeat, stack.register_forward_pre_hook(_tag_position_ids, with_kwargs=True))
    else:
        stack.rotary_emb._pdf_state = state
        stack._pdf_hooks = (repeat, stack.rotary_emb.register_forward_hook(_add_paths, with_kwargs=True))
    bindings = []
    for index, attn in enumerate(decoder.attentions):
        signature = inspect.signature(attn.forward)
        outputs = 3 if "output_attentions" in signature.parameters else 2  # a guess: prove_live settles it
        attn._pdf = Binding(state, index, signature, outputs, _mrope_section(attn, stack.config), form)
        attn.forward = types.MethodType(pdf_forward, attn)
        bindings.append(attn._pdf)
    return bindings


def unpatch_decoder(decoder: Decoder) -> None:
    """Undo ``patch_decoder`` (after a failed proof): the modules' own forwards and no hooks again."""
    stack = decoder.stack
    for handle in stack._pdf_hooks:
        handle.remove()
    del stack._pdf_hooks, stack._pdf_state
    if hasattr(getattr(stack, "rotary_emb", None), "_pdf_state"):
        del stack.rotary_emb._pdf_state
    for attn in decoder.attentions:
        if hasattr(attn, "_pdf"):
            del attn.forward, attn._pdf


def _dry_forward(decoder: Decoder) -> None:
    stack = decoder.stack
    embed = stack.embed_tokens.weight
    # with a mask, as real calls pass one (4.53's text model fails on 3-D positions without it)
    mask = embed.new_ones(1, 2, dtype=torch.long)
    with torch.no_grad():
        if decoder.form.embeds_images:  # Phi-3-V's stack embeds input_ids itself; one text-only row
            stack(input_ids=mask.clone(), attention_mask=mask, image_sizes=[None], use_cache=False)
        else:
            stack(inputs_embeds=embed.new_zeros(1, 2, embed.shape[1]), attention_mask=mask, use_cache=False)


def prove_live(decoder: Decoder, bindings: list[Binding]) -> None:
    """A two-token dry forward of the patched language model; every layer must have run the PDF attention.

    It also settles how many values the attention returns: the signature's guess (3 where the forward takes
    ``output_attentions``) is wrong for some releases (4.53 to 5.0 keep the parameter but return 2), and the
    decoder layer's own unpacking tells."""
    before = [b.calls for b in bindings]
    stack = decoder.stack
    modes = {m: m.training for m in stack.modules()}
    state = stack._pdf_state
    paths, state.paths = state.paths, (0,)
    stack.eval()
    try:
        guess = bindings[0].outputs
        for outputs in (guess, 5 - guess):  # 2 or 3
            for binding in bindings:
                binding.outputs = outputs
            try:
                _dry_forward(decoder)
                break
            except ValueError as exc:  # "too many values to unpack" / "not enough values to unpack"
                if "to unpack" not in str(exc) or outputs != guess:
                    raise
    except Exception as exc:
        raise RuntimeError(f"apply_pdf: the dry forward of the patched language model failed: {exc!r}") from exc
    finally:
        state.paths = paths
        for module, training in modes.items():
            module.training = training
    missed = [i for i, b in enumerate(bindings) if b.calls == before[i]]
    if missed:
        raise RuntimeError(f"apply_pdf: the patch is not live: the language model's forward did not call the PDF "
                           f"attention in layers {missed} (its decoder layers do not call their self_attn)")
