"""When the prefix attention kernels stream tiles through tensor descriptors (TMA, sm_90), and the descriptors.

``PDFKERNELS_TMA`` (``pdfkernels.settings``): ``auto`` (default) gives the sm_90 16-bit kernels of the padded
layout tensor descriptors on Hopper-class GPUs whenever every tensor a kernel streams can be described (16-byte
aligned base, positive strides that are multiples of 16 bytes, unit-stride head_dim); anything else takes the
pointer-load kernels, which ship beside them. ``0``: pointer loads everywhere. ``1``: descriptors wherever the
tensors allow, under Triton's interpreter too (tests); refused on a GPU without TMA.
"""

from __future__ import annotations

import torch

from . import backend, settings
from .prefix_attention_kernels import (
    prefix_attention_bwd_dkdv_kernel,
    prefix_attention_bwd_dprefix_kernel,
    prefix_attention_bwd_dq_kernel,
    prefix_attention_fwd_kernel,
)

# which tile's rows each kernel's tensor descriptors deliver: key tiles (forward, dQ), query tiles (dK/dV,
# dprefix)
DESC_ROWS = {prefix_attention_fwd_kernel: "BLOCK_N", prefix_attention_bwd_dq_kernel: "BLOCK_N",
             prefix_attention_bwd_dkdv_kernel: "BLOCK_M", prefix_attention_bwd_dprefix_kernel: "BLOCK_M"}


def arch_of(device: torch.device) -> int:
    """Which tuned tiles a device gets: sm_90 tiles for Hopper and newer (and under the interpreter)."""
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def tma_arch(dtype: torch.dtype, arch: int) -> bool:
    """Where tiles may come through tensor descriptors: 16-bit inputs on sm_90 tiles."""
    return arch >= 90 and dtype != torch.float32


def _describable(t: torch.Tensor) -> bool:
    """What a TMA descriptor can address: 16-byte aligned base, unit-stride last dim, and every other dim
    of size > 1 with a positive stride that is a multiple of 16 bytes (expanded or odd slices: no)."""
    if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(s > 0 and s * t.element_size() % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def use_tma(device: torch.device, dtype: torch.dtype, varlen: bool, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether a kernel gets tensor descriptors for ``tensors`` (the ones it streams), see the module doc."""
    mode = settings.get(settings.TMA)
    compiled_gpu = device.type == "cuda" and not backend.interpreting()
    arch = arch_of(device)
    if mode == "1" and compiled_gpu and arch < 90:
        raise RuntimeError(f"{settings.TMA.name}=1 asks for tensor descriptors (TMA), which need sm_90 or newer; "
                           f"this GPU ({device}) takes the sm_80 kernels")
    if mode == "0" or (mode == "auto" and not compiled_gpu) or varlen or not tma_arch(dtype, arch):
        return False
    return all(_describable(t) for t in tensors)


def descriptors(kernel, params: dict, tensors: tuple[torch.Tensor, ...]) -> tuple:
    """The ``*_desc`` arguments of a launch: 4-D ``[sequences, heads, tokens, head_dim]`` descriptors whose
    box is one tile (rows: the kernel's streamed tile, columns: BLOCK_D, zero-filled past head_dim), or the
    tensors themselves when the kernel takes pointers (the arguments are then unused)."""
    if not params["TMA"]:
        return tensors
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [1, 1, params[DESC_ROWS[kernel]], params["BLOCK_D"]]
    unit = 16 // tensors[0].element_size()  # a dim of size 1 is never stepped: any valid stride will do
    return tuple(TensorDescriptor(t, list(t.shape), [s if n > 1 else unit for s, n in zip(t.stride(), t.shape)],
                                  block) for t in tensors)
