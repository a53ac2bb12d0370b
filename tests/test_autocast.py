"""Prefix attention under autocast behaves as SDPA does: inputs cast to the autocast dtype, no mixed-dtype
error inside autocast, the clear error outside it; the patched tiny models run forward and backward under
CPU bf16 autocast and match fp32 within bf16 tolerance."""

import pytest
import torch

import pdfkernels
from pdfkernels import models
from tests.models.builders import build_inputs, build_model


def _inputs(dtype_v=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k = torch.randn(2, 2, 6, 8, generator=g)
    v = torch.randn(2, 2, 6, 8, generator=g).to(dtype_v)  # a Linear's output under autocast
    pk, pv = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    return q, k, v, pk, pv, torch.tensor([0, 1])


def test_mixed_dtypes_under_autocast_are_cast_like_sdpa():
    q, k, v, pk, pv, ids = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pdfkernels.prefix_attention(q, k, v, pk, pv, ids)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.dtype == sdpa.dtype == torch.bfloat16
    bf = [t.to(torch.bfloat16) for t in (q, k, v, pk, pv)]
    torch.testing.assert_close(out, pdfkernels.prefix_attention(*bf, ids))


def test_varlen_under_autocast():
    q, k, v, pk, pv, ids = _inputs()
    flat = [t.transpose(1, 2).reshape(12, t.shape[1], 8) for t in (q, k, v)]
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pdfkernels.prefix_attention_varlen(*flat, pk, pv, cu, 6, ids)
    assert out.dtype == torch.bfloat16


def test_mixed_dtypes_outside_autocast_still_refused():
    with pytest.raises(TypeError, match="argument 'v' expected dtype torch.float32"):
        pdfkernels.prefix_attention(*_inputs())


def test_float64_is_not_cast_by_autocast():
    q, k, v, pk, pv, ids = _inputs(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="argument 'v'"):
        pdfkernels.prefix_attention(q, k, v, pk, pv, ids)


@pytest.mark.parametrize("backbone", ["qwen2vl", "llava-next-mistral"])
def test_patched_model_under_bf16_autocast_matches_fp32(backbone):
    torch.manual_seed(0)
    model = models.apply_pdf(build_model(backbone), num_paths=2, prefix_len=3, seed=0)
    inputs = build_inputs(backbone, model)
    results = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            reps = models.encode(model, inputs, [0, 1]).float()
        reps.square().sum().backward()
        prefix = models.pdf_parameters(model)[0]
        results[precision] = (reps.detach(), prefix.grad.clone())
    (reps32, grad32), (reps16, grad16) = results["fp32"], results["bf16"]
    assert torch.isfinite(reps16).all() and torch.isfinite(grad16).all()
    torch.testing.assert_close(reps16, reps32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(grad16, grad32, rtol=0.1, atol=0.1 * grad32.abs().max().item())
