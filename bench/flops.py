"""Exact FLOPs of one timed call of a (patched or plain) multimodal model, attention included.

Two parts, both read off the call itself:

- Linear and Conv layers (and every other matrix product outside attention: losses, aggregator, estimator) by
  ``FlopCounterMode`` over the real call, forward and backward, counting only ``mm``/``addmm``/``convolution``
  at 2 x MACs (Table 4's convention; ``bench/table4.py`` counts the same ops on the meta device).
- Attention's score and value products from the shapes each attention stack received, in FlashAttention's
  convention: forward ``4 · D`` per (query, visible key) pair and head; backward 2.5 x the forward, counted when a
  backward actually passes through the stack. Text: causal over the real tokens plus the K prefix keys of every
  active path (the stack's rows repeat per path); vision: full attention within the blocks each vision attention
  module receives (Qwen2-VL's ``cu_seqlens``: frames, or Qwen2.5-VL's windows; a CLIP tower's tiles).
  SDPA's own kernels are never counted by the first part, so nothing counts twice.

Gradient checkpointing's recompute is counted by the first part only (the benchmarks run without it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from pdfkernels.models.anatomy import decoder_stack, hf_model, inner_model

COUNTED_OPS = ("mm", "addmm", "convolution")  # Linear and Conv layers; attention kernels are other ops
BACKWARD_FACTOR = 2.5  # FlashAttention's convention: the backward's five products against the forward's two


def linear_conv_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the ``mm``/``addmm``/``convolution`` calls made by ``fn()`` (forward and any backward in it)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op).split(".")[1] in COUNTED_OPS)


def text_attention_flops(lengths: list[int], prefix_len: int, paths: int, layers: int, heads: int,
                         head_dim: int) -> int:
    """Forward FLOPs of causal attention over rows of ``lengths`` real tokens, each query also seeing the K
    prefix keys, for ``paths`` copies of the rows (one per active path)."""
    pairs = sum(prefix_len * n + n * (n + 1) // 2 for n in lengths)
    return 4 * head_dim * heads * layers * paths * pairs


def full_attention_flops(tokens_per_block: list[int], layers: int, width: int) -> int:
    """Forward FLOPs of full (bidirectional) attention within blocks of tokens; ``width`` = heads x head_dim."""
    return 4 * width * layers * sum(n * n for n in tokens_per_block)


@dataclass
class FlopCount:
    linear: int = 0
    text_attention: int = 0
    vision_attention: int = 0
    calls: dict = field(default_factory=lambda: {"text": 0, "vision": 0, "text_backward": 0, "vision_backward": 0})

    @property
    def attention(self) -> int:
        return self.text_attention + self.vision_attention

    @property
    def total(self) -> int:
        return self.linear + self.attention

    def as_dict(self) -> dict:
        return {"linear": self.linear, "text_attention": self.text_attention,
                "vision_attention": self.vision_attention, "total": self.total, "calls": dict(self.calls)}


def _arg(args: tuple, kwargs: dict, name: str, position: int):
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


class _AttentionHooks:
    """Forward hooks on the text decoder stack and the vision tower that add each call's attention FLOPs, and a
    gradient hook on the output that adds the backward's when a backward passes through."""

    def __init__(self, model: torch.nn.Module, count: FlopCount):
        self.hf, self.count, self.handles = hf_model(model), count, []
        self.stack = decoder_stack(self.hf)
        text = self.stack.config
        self.text_shape = (len(self.stack.layers), text.num_attention_heads, self.stack.layers[0].self_attn.head_dim)
        inner = inner_model(model)
        self.vision = None
        if inner is not None:
            self.vision = getattr(inner, "visual", None) or getattr(inner, "vision_tower", None)

    def __enter__(self):
        # prepended: it sees the B rows before PDF's own pre-hook repeats them for k paths
        self.handles.append(self.stack.register_forward_pre_hook(self._text_pre, with_kwargs=True, prepend=True))
        self.handles.append(self.stack.register_forward_hook(self._text_post))
        if self.vision is not None:
            self.handles.append(self.vision.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
            self.handles.append(self.vision.register_forward_hook(self._vision_post))
            attention = [m for m in self.vision.modules() if type(m).__name__.endswith("Attention")]
            if not attention:
                raise ValueError(f"count_flops: no attention module (class name ending in 'Attention') in the "
                                 f"vision tower {type(self.vision).__name__}")
            for m in attention:
                self.handles.append(m.register_forward_pre_hook(self._vision_attention_pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _text_pre(self, module, args, kwargs):
        embeds = _arg(args, kwargs, "inputs_embeds", 4)
        ids = _arg(args, kwargs, "input_ids", 0)
        rows, length = (embeds.shape[:2] if embeds is not None else ids.shape[:2])
        mask = kwargs.get("attention_mask")
        lengths = ([length] * rows if mask is None or mask.dim() != 2 else mask.sum(1).tolist())
        state = getattr(self.hf, "pdf_state", None)
        active = len(state.paths) if state is not None else 0
        prefix = self.hf.pdf_prefix_len if active else 0
        self._text_pending = text_attention_flops(lengths, prefix, max(1, active), *self.text_shape)
        self.count.text_attention += self._text_pending
        self.count.calls["text"] += 1

    def _text_post(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self._on_backward(hidden, self._text_pending, "text")

    def _vision_pre(self, module, args, kwargs):
        self._vision_pending = 0
        self.count.calls["vision"] += 1

    def _vision_attention_pre(self, module, args, kwargs):
        hidden = _arg(args, kwargs, "hidden_states", 0)
        cu_seqlens = _arg(args, kwargs, "cu_seqlens", 1)
        if isinstance(cu_seqlens, torch.Tensor):  # Qwen2-VL's packed patches: full attention per block
            blocks = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        else:  # [tiles, tokens, width]: full attention per tile (CLIP)
            blocks = [hidden.shape[1]] * hidden.shape[0]
        flops = full_attention_flops(blocks, 1, hidden.shape[-1])
        self._vision_pending += flops
        self.count.vision_attention += flops

    def _vision_post(self, module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else (
            output[0] if isinstance(output, tuple) else output.last_hidden_state)
        self._on_backward(hidden, self._vision_pending, "vision")

    def _on_backward(self, hidden: torch.Tensor, forward: int, kind: str) -> None:
        if not hidden.requires_grad:
            return

        def add(grad):
            setattr(self.count, f"{kind}_attention", getattr(self.count, f"{kind}_attention")
                    + int(BACKWARD_FACTOR * forward))
            self.count.calls[f"{kind}_backward"] += 1

        hidden.register_hook(add)


def count_flops(model: torch.nn.Module, fn: Callable[[], object]) -> FlopCount:
    """The FLOPs of ``fn()``, a call that runs ``model`` (forward, or a whole training step)."""
    count = FlopCount()
    with _AttentionHooks(model, count):
        count.linear = linear_conv_flops(fn)
    return count
