"""Dispatch is explicit: device decides, the environment variable overrides, and bad values are refused."""

import pytest
import torch

from pdfkernels import backend


def test_cpu_tensors_use_torch_path(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert not backend.use_triton(torch.zeros(1))
    assert backend.use_triton(torch.zeros(1, device="meta")) is False


def test_env_forces_triton_or_torch(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert backend.use_triton(torch.zeros(1))
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert not backend.use_triton(torch.zeros(1))


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="PDFKERNELS_BACKEND expected one of"):
        backend.use_triton(torch.zeros(1))
