"""Input checks shared by every public op.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device or
value) with a message that names the op, the argument, what was expected and what came.
"""

from __future__ import annotations

import torch

# float64 is accepted so that references and tests can run in double precision.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(op: str, name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    """``t`` is a tensor with ``ndim`` dimensions; ``layout`` names them for the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' expected {ndim} dimensions {layout}, got shape {_shape(t)}")
    return t


def check_float(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``t`` has a supported float dtype, equal to ``dtype`` when given."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: argument '{name}' expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: argument '{name}' expected dtype {dtype} (the dtype of q/y), got {t.dtype}")


def check_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' expected device {device} (the device of the first input), "
                         f"got {t.device}")


def check_dims(op: str, name: str, t: torch.Tensor, expected: dict[int, tuple[str, int]]) -> None:
    """Each ``dim -> (symbol, size)`` of ``t`` matches."""
    for dim, (symbol, size) in expected.items():
        if t.shape[dim] != size:
            raise ValueError(f"{op}: argument '{name}' expected size {symbol}={size} at dim {dim}, "
                             f"got shape {_shape(t)}")


def values_readable(t: torch.Tensor) -> bool:
    """True when a check may read ``t``'s values on the host: in eager mode, outside a CUDA-graph capture. Inside
    ``torch.compile`` or a capture a host read would break the graph (or the capture), so value checks become
    device-side asserts there (``torch._assert_async``): the same condition, without a sync."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _assert_on_device(condition: torch.Tensor, message: str) -> None:
    torch._assert_async(condition.all(), message)


def check_ids(op: str, name: str, ids: object, length: int, upper: int, length_symbol: str,
              upper_symbol: str, device: torch.device, check_range: bool = True) -> torch.Tensor:
    """Integer ids of shape ``[length]`` with values in ``[0, upper)``. The range check costs one sync on
    CUDA; callers that built the ids from validated values skip it (``check_range=False``)."""
    ids = check_tensor(op, name, ids, 1, f"[{length_symbol}]")
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: argument '{name}' expected an integer dtype, got {ids.dtype}")
    check_device(op, name, ids, device)
    if ids.shape[0] != length:
        raise ValueError(f"{op}: argument '{name}' expected shape [{length_symbol}={length}], got {_shape(ids)}")
    if length and check_range and not values_readable(ids):
        _assert_on_device((ids >= 0) & (ids < upper), f"{op}: argument '{name}' expected values in "
                                                      f"[0, {upper_symbol}={upper})")
    elif length and check_range:
        lo, hi = (int(x) for x in torch.stack([ids.min(), ids.max()]).tolist())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{op}: argument '{name}' expected values in [0, {upper_symbol}={upper}), "
                             f"got values in [{lo}, {hi}]")
    return ids


def check_scale(op: str, softmax_scale: object, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{op}: argument 'softmax_scale' expected a float or None, "
                        f"got {type(softmax_scale).__name__}")
    if not softmax_scale > 0 or softmax_scale == float("inf"):
        raise ValueError(f"{op}: argument 'softmax_scale' expected a finite value > 0, got {softmax_scale}")
    return float(softmax_scale)


def _check_prefix(op: str, prefix_k: object, prefix_v: object, hkv: int, head_dim: int,
                  dtype: torch.dtype, device: torch.device) -> int:
    for name, p in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        check_tensor(op, name, p, 4, "[N, Hkv, K, D]")
        check_float(op, name, p, dtype)
        check_device(op, name, p, device)
        check_dims(op, name, p, {1: ("Hkv", hkv), 3: ("D", head_dim)})
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"{op}: argument 'prefix_v' expected the shape of prefix_k {_shape(prefix_k)}, "
                         f"got {_shape(prefix_v)}")
    if prefix_k.shape[0] < 1:
        raise ValueError(f"{op}: argument 'prefix_k' expected N >= 1 paths, got shape {_shape(prefix_k)}")
    return prefix_k.shape[0]


def _check_heads(op: str, h: int, hkv: int) -> None:
    if hkv < 1 or h % hkv:
        raise ValueError(f"{op}: arguments 'q'/'k' expected query heads H divisible by kv heads Hkv, "
                         f"got H={h}, Hkv={hkv}")


def check_prefix_attention(q, k, v, prefix_k, prefix_v, path_ids, key_padding_mask, causal,
                           softmax_scale, check_path_range: bool = True) -> float:
    """Checks the padded layout; returns the softmax scale to use."""
    op = "prefix_attention"
    check_tensor(op, "q", q, 4, "[B, H, L, D]")
    check_float(op, "q", q)
    b, h, length, d = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, 4, "[B, Hkv, L, D]")
        check_float(op, name, t, q.dtype)
        check_device(op, name, t, q.device)
        check_dims(op, name, t, {0: ("B", b), 2: ("L", length), 3: ("D", d)})
    if v.shape != k.shape:
        raise ValueError(f"{op}: argument 'v' expected the shape of k {_shape(k)}, got {_shape(v)}")
    _check_heads(op, h, k.shape[1])
    n = _check_prefix(op, prefix_k, prefix_v, k.shape[1], d, q.dtype, q.device)
    check_ids(op, "path_ids", path_ids, b, n, "B", "N", q.device, check_path_range)
    if key_padding_mask is not None:
        check_tensor(op, "key_padding_mask", key_padding_mask, 2, "[B, L]")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{op}: argument 'key_padding_mask' expected dtype torch.bool (True = real token), "
                            f"got {key_padding_mask.dtype}")
        check_device(op, "key_padding_mask", key_padding_mask, q.device)
        check_dims(op, "key_padding_mask", key_padding_mask, {0: ("B", b), 1: ("L", length)})
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: argument 'causal' expected a bool, got {type(causal).__name__}")
    return check_scale(op, softmax_scale, d)


def check_cu_seqlens(op: str, cu_seqlens: object, total: int, max_seqlen: object,
                     device: torch.device) -> int:
    """cu_seqlens int32 ``[S+1]``, starts at 0, non-decreasing, ends at ``total``; returns S."""
    cu = check_tensor(op, "cu_seqlens", cu_seqlens, 1, "[S+1]")
    if cu.dtype != torch.int32:
        raise TypeError(f"{op}: argument 'cu_seqlens' expected dtype torch.int32, got {cu.dtype}")
    check_device(op, "cu_seqlens", cu, device)
    if cu.shape[0] < 2:
        raise ValueError(f"{op}: argument 'cu_seqlens' expected shape [S+1] with S >= 1, got {_shape(cu)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"{op}: argument 'max_seqlen' expected an int, got {type(max_seqlen).__name__}")
    if not values_readable(cu):
        lengths = cu[1:] - cu[:-1]
        _assert_on_device(cu[0] == 0, f"{op}: argument 'cu_seqlens' expected to start at 0")
        _assert_on_device(cu[-1] == total, f"{op}: argument 'cu_seqlens' expected to end at T={total}")
        _assert_on_device(lengths >= 0, f"{op}: argument 'cu_seqlens' expected non-decreasing offsets")
        _assert_on_device(lengths <= max_seqlen, f"{op}: argument 'max_seqlen' expected >= the longest sequence")
        return cu.shape[0] - 1
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{op}: argument 'cu_seqlens' expected to start at 0 and end at T={total}, "
                         f"got first {values[0]}, last {values[-1]}")
    if min(lengths) < 0:
        raise ValueError(f"{op}: argument 'cu_seqlens' expected non-decreasing offsets, "
                         f"got a decrease at index {lengths.index(min(lengths)) + 1}")
    if max_seqlen < max(lengths):
        raise ValueError(f"{op}: argument 'max_seqlen' expected >= the longest sequence ({max(lengths)}), "
                         f"got {max_seqlen}")
    return len(lengths)


def check_prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, path_ids, causal,
                                  softmax_scale) -> float:
    """Checks the packed layout; returns the softmax scale to use."""
    op = "prefix_attention_varlen"
    check_tensor(op, "q", q, 3, "[T, H, D]")
    check_float(op, "q", q)
    total, h, d = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, 3, "[T, Hkv, D]")
        check_float(op, name, t, q.dtype)
        check_device(op, name, t, q.device)
        check_dims(op, name, t, {0: ("T", total), 2: ("D", d)})
    if v.shape != k.shape:
        raise ValueError(f"{op}: argument 'v' expected the shape of k {_shape(k)}, got {_shape(v)}")
    _check_heads(op, h, k.shape[1])
    n = _check_prefix(op, prefix_k, prefix_v, k.shape[1], d, q.dtype, q.device)
    s = check_cu_seqlens(op, cu_seqlens, total, max_seqlen, q.device)
    check_ids(op, "path_ids", path_ids, s, n, "S", "N", q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: argument 'causal' expected a bool, got {type(causal).__name__}")
    return check_scale(op, softmax_scale, d)


def check_gaussian(op: str, y, mu, logvar, layout: str, min_paths: int = 0, min_batch: int = 1) -> None:
    """y, mu, logvar share one shape (``[B, d]`` or ``[N, B, d]``), float dtype and device."""
    ndim = 2 if layout == "[B, d]" else 3
    check_tensor(op, "y", y, ndim, layout)
    check_float(op, "y", y)
    for name, t in (("mu", mu), ("logvar", logvar)):
        check_tensor(op, name, t, ndim, layout)
        check_float(op, name, t, y.dtype)
        check_device(op, name, t, y.device)
        if t.shape != y.shape:
            raise ValueError(f"{op}: argument '{name}' expected the shape of y {_shape(y)}, got {_shape(t)}")
    if ndim == 3 and y.shape[0] < min_paths:
        raise ValueError(f"{op}: argument 'y' expected N >= {min_paths} paths in {layout}, got {_shape(y)}")
    if y.shape[-2] < min_batch:
        raise ValueError(f"{op}: argument 'y' expected B >= {min_batch} samples in {layout}, got {_shape(y)}")
    if y.shape[-1] < 1:
        raise ValueError(f"{op}: argument 'y' expected d >= 1 in {layout}, got {_shape(y)}")
