"""What every benchmark module shares: the device, the quick switch, and where results go."""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
QUICK = os.environ.get("PDFKERNELS_BENCH_QUICK") == "1"  # CI-sized CPU run (python -m pdfkernels.bench --quick)


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()
