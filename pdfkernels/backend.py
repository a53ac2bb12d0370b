"""Which implementation an op runs: explicit, per call, from the tensors' device and one variable.

- CUDA tensors run the Triton kernels.
- CPU tensors run the PyTorch path (the reference, or a faster closed form tested against it).
- ``PDFKERNELS_BACKEND=triton`` forces the Triton kernels (on a CPU: set ``TRITON_INTERPRET=1`` too,
  before pdfkernels is imported); ``PDFKERNELS_BACKEND=torch`` forces the PyTorch path everywhere.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "PDFKERNELS_BACKEND"
POISON_VAR = "PDFKERNELS_POISON"  # tests set it: kernel outputs start as NaN, so an unwritten element fails
CHOICES = ("auto", "triton", "torch")


def requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"environment variable {ENV_VAR} expected one of {CHOICES}, got {value!r}")
    return value


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` must run its Triton kernel."""
    choice = requested()
    if choice == "auto":
        return t.is_cuda
    return choice == "triton"


def interpreting() -> bool:
    """Triton's interpreter runs kernels on the CPU; some dtypes need upcasting there (FACTS.md)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_output(like: torch.Tensor, shape: tuple[int, ...] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output buffer for a kernel: ``like``'s strides (or ``shape``), NaN-filled when poisoning is on."""
    if shape is None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if os.environ.get(POISON_VAR) == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out
