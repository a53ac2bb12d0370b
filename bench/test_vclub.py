"""vCLUB MIM loss, forward + backward: ours against CLUB's [B, B, d] broadcast and the plain-PyTorch closed form.

    pytest bench/test_vclub.py --benchmark-only

GPU: the paper's sizes, B = 1024 with N = 2, d = 1536 (2B; also B = 256, 512) and N = 4, d = 3584 (7B).
CPU: B = 128, 256, 512 with N = 2, d = 1536 (the broadcast of the full sizes does not fit next to its
gradients in 24 GB); --quick: B = 64, 128. Peak
extra memory and the floor (reading y, mu, logvar once) are attached to each result as extra_info.
"""

from __future__ import annotations

import os

import pytest
import torch

import pdfkernels
from pdfkernels import settings
from pdfkernels.baselines import club_broadcast_mim
from pdfkernels.bench.common import CUDA, DEVICE, QUICK, device_name, library_version
from pdfkernels.bench.memory import cpu_peak_extra_bytes, cuda_peak_extra_bytes
from pdfkernels.bench.schema import timed_info

if CUDA:
    SHAPES = [(2, 256, 1536), (2, 512, 1536), (2, 1024, 1536), (4, 1024, 3584)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(2, 64, 1536), (2, 128, 1536)] if QUICK else [(2, 128, 1536), (2, 256, 1536), (2, 512, 1536)]
    DTYPE = torch.float32


def _ours(y, mu, logvar):
    return pdfkernels.mim_loss(y, mu, logvar)


def _closed_form_torch(y, mu, logvar):
    previous = os.environ.get(settings.BACKEND.name)
    os.environ[settings.BACKEND.name] = "torch"
    try:
        return pdfkernels.mim_loss(y, mu, logvar)
    finally:
        if previous is None:
            del os.environ[settings.BACKEND.name]
        else:
            os.environ[settings.BACKEND.name] = previous


PROVIDERS = {"pdfkernels": _ours, "closed-form-torch": _closed_form_torch, "club-broadcast": club_broadcast_mim}


def _inputs(n, b, d, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(n, b, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_() for _ in range(3)]


def _step(fn, inputs):
    for t in inputs:
        t.grad = None
    fn(*inputs).backward()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def prepared_step(provider: str, n: int, b: int, d: int):
    """Warm-up on a tiny batch (lazy imports, allocator), then inputs built; the returned call runs one
    forward+backward (for the memory probe)."""
    _step(PROVIDERS[provider], _inputs(n, 4, d, seed=1))
    inputs = _inputs(n, b, d, seed=0)
    return lambda: _step(PROVIDERS[provider], inputs)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("n,b,d", SHAPES, ids=[f"N{n}-B{b}-d{d}" for n, b, d in SHAPES])
def test_mim_loss_forward_backward(benchmark, provider, n, b, d):
    fn = PROVIDERS[provider]
    rotation = [_inputs(n, b, d, seed) for seed in range(3)]  # rotated so caches do not flatter
    calls = iter(range(10**9))
    _step(fn, rotation[0])  # warm-up (and kernel compile)
    benchmark.pedantic(lambda: _step(fn, rotation[next(calls) % 3]), rounds=5 if DEVICE.type == "cpu" else 20,
                       iterations=1, warmup_rounds=1)
    element_bytes = torch.finfo(DTYPE).bits // 8
    peak = (cuda_peak_extra_bytes(lambda: _step(fn, rotation[0])) if DEVICE.type == "cuda"
            else cpu_peak_extra_bytes("pdfkernels.bench.test_vclub:prepared_step", provider, n, b, d))
    library = "pdfkernels" if provider == "pdfkernels" else "torch"
    benchmark.extra_info.update(timed_info(
        provider, "fwd+bwd", f"N{n} B{b} d{d}", str(DTYPE).removeprefix("torch."), device_name(),
        library_version(library), peak_extra_bytes=peak, N=n, B=b, d=d, input_bytes=3 * n * b * d * element_bytes))
