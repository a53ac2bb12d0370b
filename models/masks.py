"""Whatever attention mask a decoder layer hands its attention, as the ``[B, L]`` key padding mask our kernels read.

Models pass ``None`` (causal, nothing padded), a 2-D padding mask (flash-attention layouts), or a 4-D
``[B, 1, L, >=L]`` mask, boolean (True = attend; transformers 5.x SDPA) or additive float (0 = attend, a
large negative = masked; eager, and SDPA before 5.x). A 4-D mask is accepted only if it is causal plus key
padding on every real query row (a padded query row may also be empty or full: its output is never used); anything
else (sliding windows, packed sequences, bidirectional or biased masks, flex ``BlockMask``) is refused.

Under ``torch.compile`` the same conversion is traced without reading values on the host: no per-mask cache
(each layer converts; the compiler sees the same ops), the mask is returned even when nothing is padded (the
kernels give the same result), and the causal-plus-padding checks become device-side asserts.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

# one conversion per mask tensor and forward (all layers share it); a device sync happens only here
_CONVERTED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_ALL_REAL = object()


def key_padding_mask(mask, batch: int, length: int) -> torch.Tensor | None:
    """``[B, L]`` bool (True = real token) or None when no token is padded; refuses masks that are not
    causal plus padding with ``NotImplementedError``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(f"pdf attention: attention mask of type {type(mask).__name__} is not supported "
                                  "(use attn_implementation 'sdpa', 'eager' or 'flash_attention_2', not flex)")
    if mask.device.type == "meta":  # no values to read: a meta forward (shapes only, e.g. counting) runs unmasked
        return None
    if torch.compiler.is_compiling():
        return _convert(mask, batch, length, traced=True)
    version, cached = _CONVERTED.get(mask, (None, None))
    if version != mask._version:  # first sight of this mask, or it was modified in place since
        cached = _convert(mask, batch, length)
        _CONVERTED[mask] = (mask._version, cached)
    return None if cached is _ALL_REAL else cached


def _require(condition: torch.Tensor, message: str, traced: bool) -> None:
    """Refuse the mask unless ``condition`` holds everywhere: eagerly, or as a device-side assert when traced."""
    if traced:
        torch._assert_async(condition.all(), message)
    elif not bool(condition.all()):
        raise NotImplementedError(message)


def _convert(mask: torch.Tensor, batch: int, length: int, traced: bool = False):
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, length):
            raise NotImplementedError(f"pdf attention: 2-D attention mask of shape {tuple(mask.shape)}, expected "
                                      f"[{batch}, {length}] (a key/value cache is not supported)")
        padding = mask.to(torch.bool)
    elif mask.dim() == 4:
        padding = _padding_of_4d(mask, batch, length, traced)
    else:
        raise NotImplementedError(f"pdf attention: attention mask with {mask.dim()} dimensions, expected a [B, L] "
                                  "padding mask or a [B, 1, L, L] causal mask")
    if traced:
        return padding
    return _ALL_REAL if bool(padding.all()) else padding


def _padding_of_4d(mask: torch.Tensor, batch: int, length: int, traced: bool) -> torch.Tensor:
    if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2] != length or mask.shape[3] < length:
        raise NotImplementedError(f"pdf attention: 4-D attention mask of shape {tuple(mask.shape)}, expected "
                                  f"[{batch}, 1, {length}, {length}] (a key/value cache is not supported)")
    mask = mask[:, 0, :, :length].expand(batch, length, length)
    if mask.dtype == torch.bool:
        visible = mask
    else:
        visible = mask == 0
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        _require(visible | blocked, "pdf attention: the additive attention mask carries biases, not only 0 and "
                 "-inf; the prefix kernels implement causal attention with key padding only", traced)
    padding = visible[:, -1, :]  # the last query row of causal + padding sees exactly the real keys
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    expected = causal & padding[:, None, :]
    # a padded query row may also be empty or (SDPA's fix for empty rows) full: its output is never used
    blank = ~visible.any(-1) | visible.all(-1)
    right = (visible == expected).all(-1) | (~padding & blank)
    _require(right, "pdf attention: the model asks for an attention mask other than causal plus padding (a sliding "
             "window shorter than the sequence, packed sequences or a bidirectional mask), which the prefix kernels "
             "do not implement", traced)
    return padding
