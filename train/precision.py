"""Mixed precision as VLM2Vec trains: the backbone's frozen weights in bf16, fp32 master copies only of what
trains (adapter, prefix, aggregator, estimator; the optimizer state follows them), forwards under bf16
autocast. ``--dtype auto`` means bf16 on GPUs and fp32 on CPUs; ``--dtype bf16`` on a CPU runs the same
code path with the CPU's autocast (that is how the tests exercise it)."""

from __future__ import annotations

import contextlib

import torch


def uses_bf16(dtype: str, device: torch.device) -> bool:
    """``dtype`` as TrainConfig validated it: "auto", "bf16" or "fp32"."""
    return dtype == "bf16" or (dtype == "auto" and torch.device(device).type == "cuda")


def autocast(dtype: str, device: torch.device):
    """The forward's context: bf16 autocast on the device, or nothing."""
    if uses_bf16(dtype, device):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def split_precision(model: torch.nn.Module) -> None:
    """Trainable parameters in fp32 (master copies), frozen ones in bf16. Buffers (rotary frequencies) stay."""
    for param in model.parameters():
        param.data = param.data.float() if param.requires_grad else param.data.to(torch.bfloat16)
