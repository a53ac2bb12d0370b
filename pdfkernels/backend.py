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
    if choice == "triton" and not t.is_cuda and not interpreting():  # Triton would say "0 active drivers"
        raise RuntimeError(f"{ENV_VAR}=triton on a {t.device.type} tensor needs Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 before pdfkernels is imported, use CUDA tensors, or set "
                           f"{ENV_VAR}=torch")
    return choice == "triton"


TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # what the kernels take


def use_triton_for(op: str, t: torch.Tensor) -> bool:
    """``use_triton(t)``, refusing dtypes the kernels do not take rather than falling back silently."""
    if not use_triton(t):
        return False
    if t.dtype not in TRITON_TYPES:
        raise TypeError(f"{op}: the Triton kernels take float16, bfloat16 or float32 inputs, got {t.dtype} "
                        f"(float64 runs on the PyTorch path: {ENV_VAR}=torch)")
    return True


def interpreting() -> bool:
    """Triton's interpreter runs kernels on the CPU; its dot on 16-bit tiles is wrong, so they are upcast there. Read as
    Triton reads ``TRITON_INTERPRET`` (its knob takes "true", "on", "yes" too); a Triton without knobs
    (before 3.4) compared the variable with "1"."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """What the PyTorch paths accumulate in: fp32, or fp64 for fp64 inputs (which the kernels do not take)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
