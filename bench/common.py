"""What every benchmark module shares: the device, the quick switch, and where results go."""

from __future__ import annotations

import torch

from pdfkernels import settings

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
QUICK = settings.on(settings.BENCH_QUICK)  # CI-sized CPU run (python -m pdfkernels.bench --quick)


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def library_version(library: str) -> str:
    """The version of the library that a provider's timed code comes from, for its result row."""
    import importlib.metadata

    if library == "pdfkernels":
        import triton

        import pdfkernels
        kernels = f"triton {triton.__version__}" if CUDA else "its PyTorch path on CPU"
        return f"pdfkernels {pdfkernels.__version__} ({kernels})"
    if library == "cudnn":
        return f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    if library == "torch":
        return f"torch {torch.__version__}"
    return f"{library} {importlib.metadata.version(library)}"
