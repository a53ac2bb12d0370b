"""Dispatch is explicit: device decides, the environment variable overrides, and bad values are refused."""

import pytest
import torch

from pdfkernels import backend, settings


def test_cpu_tensors_use_torch_path(monkeypatch):
    monkeypatch.delenv(settings.BACKEND.name, raising=False)
    assert not backend.use_triton(torch.zeros(1))
    assert backend.use_triton(torch.zeros(1, device="meta")) is False


def test_env_forces_triton_or_torch(monkeypatch):
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    assert backend.use_triton(torch.zeros(1))
    monkeypatch.setenv(settings.BACKEND.name, "torch")
    assert not backend.use_triton(torch.zeros(1))


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv(settings.BACKEND.name, "cuda")
    with pytest.raises(ValueError, match="PDFKERNELS_BACKEND expected one of"):
        backend.use_triton(torch.zeros(1))


@pytest.mark.parametrize("value", ["1", "true", "True", "on", "yes", "0", "false", "off", ""])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):  # issue 21, item 5
    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backend.interpreting() == bool(knobs.runtime.interpret)
    assert backend.interpreting() == (value.lower() in ("1", "true", "on", "yes"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels are compiled, not interpreted, with CUDA")
def test_bf16_kernels_are_right_when_the_interpreter_is_switched_on_by_true(monkeypatch):
    from tests.test_prefix_attention import check_padded_case

    monkeypatch.setenv("TRITON_INTERPRET", "true")  # the kernels are interpreted (conftest); "true" must say so
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    check_padded_case(2, 4, 2, 7, 64, 2, 3, "left", True, torch.bfloat16)


def test_triton_forced_on_cpu_without_the_interpreter_says_what_to_set(monkeypatch):  # issue 21, item 6
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="PDFKERNELS_BACKEND=triton on a cpu tensor needs Triton's interpreter: "
                                           "set TRITON_INTERPRET=1"):
        backend.use_triton(torch.zeros(1))
