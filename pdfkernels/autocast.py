"""Autocast for the custom ops, as SDPA behaves under it: inside an enabled ``torch.autocast`` region the
float inputs are cast to the region's dtype and the op runs with autocast off (its own fp32 accumulation),
so a bf16 ``v`` beside rotary-embedded fp32 ``q``/``k`` is no error there. Outside autocast nothing is cast:
explicitly mixed dtypes still get the op's clear error."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

# autocast casts these; float64 (references, tests) is left alone, as autocast leaves it for its own ops
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def follows_autocast(fn: F) -> F:
    """Wrap an op taking its float tensors positionally (index tensors and keyword masks are not cast)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        # meta tensors (FLOP counting) and other devices without autocast: nothing to follow
        if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype in _CASTABLE else a for a in args)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
