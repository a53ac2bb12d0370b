"""Test set-up. Without CUDA, Triton kernels run under the interpreter, which must be switched on before any
kernel module is imported; with CUDA they run compiled, on CUDA tensors (``kernel_device``)."""

import os
import random

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("PDFKERNELS_POISON", "1")  # kernel outputs start as NaN: unwritten elements fail

import pytest  # noqa: E402

from pdfkernels import settings  # noqa: E402  (imports no kernel: after the interpreter switch all the same)


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs on every run; the seed is printed so a failure can be replayed."""
    seed = int(settings.get(settings.TEST_SEED) or random.SystemRandom().randrange(2**31))
    torch.manual_seed(seed)
    print(f"{settings.TEST_SEED.name}={seed}")
    return seed


@pytest.fixture
def kernel_device():
    """Where kernel tests make their tensors: CUDA when present (compiled kernels), else the CPU
    (interpreter). Set as torch's default device for the test."""
    device = torch.device("cuda" if CUDA else "cpu")
    previous = torch.get_default_device()
    torch.set_default_device(device)
    yield device
    torch.set_default_device(previous)
