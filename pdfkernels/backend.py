"""Which implementation an op runs: explicit, per call, from the tensors' device and one variable.

- CUDA tensors run the Triton kernels.
- CPU tensors run the PyTorch path (the reference, or a faster closed form tested against it).
- ``PDFKERNELS_BACKEND=triton`` forces the Triton kernels (on a CPU: set ``TRITON_INTERPRET=1`` too,
  before pdfkernels is imported); ``PDFKERNELS_BACKEND=torch`` forces the PyTorch path everywhere.
"""

from __future__ import annotations

import torch

from . import settings
from .settings import interpreting


def requested() -> str:
    return settings.get(settings.BACKEND)


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` must run its Triton kernel."""
    choice = requested()
    if choice == "auto":
        return t.is_cuda
    if choice == "triton" and not t.is_cuda and not interpreting():  # Triton would say "0 active drivers"
        name = settings.BACKEND.name
        raise RuntimeError(f"{name}=triton on a {t.device.type} tensor needs Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 before pdfkernels is imported, use CUDA tensors, or set {name}=torch")
    return choice == "triton"


__all__ = ["accumulate_dtype", "interpreting", "new_output", "requested", "use_triton", "use_triton_for"]

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # what the kernels take


def use_triton_for(op: str, t: torch.Tensor) -> bool:
    """``use_triton(t)``, refusing dtypes the kernels do not take rather than falling back silently."""
    if not use_triton(t):
        return False
    if t.dtype not in TRITON_TYPES:
        raise TypeError(f"{op}: the Triton kernels take float16, bfloat16 or float32 inputs, got {t.dtype} "
                        f"(float64 runs on the PyTorch path: {settings.BACKEND.name}=torch)")
    return True


def accumulate_dtype(t: torch.Tensor | torch.dtype) -> torch.dtype:
    """What the PyTorch paths accumulate in, and what PDF's trained parameters are kept in, for a tensor or dtype:
    fp32, or fp64 for fp64 (references and tests; the kernels do not take it)."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_output(like: torch.Tensor, shape: tuple[int, ...] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output buffer for a kernel: ``like``'s strides (or ``shape``), NaN-filled when poisoning is on."""
    if shape is None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if settings.on(settings.POISON) and out.is_floating_point():
        out.fill_(float("nan"))
    return out
