"""Dense bf16 tensor-core peaks by device name: the one table that MFU is computed against.

NVIDIA's data-sheet figures without sparsity (the sheets print twice these "with sparsity"). A device not listed
gets no MFU rather than a guessed one; a CPU never gets one.
"""

from __future__ import annotations

# (substrings that must all appear in torch.cuda.get_device_name(), dense bf16 TFLOP/s), first match wins
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.0),
    (("H100", "HBM3"), 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    (("H100", "SXM"), 989.0),
    (("A100",), 312.0),  # SXM and PCIe alike
)


def peak_tflops(device: str) -> float | None:
    """The dense bf16 peak of ``device`` (a CUDA device name), None where unknown or a CPU."""
    for needles, peak in PEAK_BF16_TFLOPS:
        if all(n in device for n in needles):
            return peak
    return None


def mfu(tflops: float | None, device: str) -> float | None:
    """Achieved TFLOP/s as a fraction of the device's peak; None without a peak or a FLOP count."""
    peak = peak_tflops(device)
    return None if peak is None or tflops is None else tflops / peak
