"""CUDA-only checks at realistic sizes: the compiled kernels against the float64 reference.

Run with ``pytest -m gpu`` on a CUDA machine; skipped elsewhere. (On a CUDA machine the kernel tests in
test_prefix_attention.py and test_gaussian_*.py also run compiled, on CUDA tensors.)
"""

import pytest
import torch

import pdfkernels
from pdfkernels import reference, settings
from pdfkernels.packing import cu_seqlens_from_lengths

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _close(ours, ref, dtype, what):
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    scale = max(ref.abs().max().item(), 1.0)
    assert torch.isfinite(ours).all(), what
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(12, 2), (32, 8)])
def test_prefix_attention_hf_layout_at_scale(dtype, heads, kv_heads, kernel_device):
    b, length, d, n, k = 2, 1024, 128, 2, 20
    q = torch.randn(b, length, heads, d, dtype=dtype).transpose(1, 2)
    key = torch.randn(b, length, kv_heads, d, dtype=dtype).transpose(1, 2)
    val = torch.randn(b, length, kv_heads, d, dtype=dtype).transpose(1, 2)
    pk, pv = torch.randn(n, kv_heads, k, d, dtype=dtype), torch.randn(n, kv_heads, k, d, dtype=dtype)
    paths = torch.tensor([0, 1])
    mask = torch.arange(length)[None] >= torch.tensor([0, 300])[:, None]  # left padding on row 1
    leaves = [t.detach().requires_grad_() for t in (q, key, val, pk, pv)]
    out = pdfkernels.prefix_attention(*leaves, paths, key_padding_mask=mask)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, upstream)
    exact = [t.detach().double().requires_grad_() for t in (q, key, val, pk, pv)]
    ref = reference.prefix_attention(*exact, paths, key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref, exact, upstream.double())
    _close(out, ref.detach(), dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        _close(g, r, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_attention_varlen_at_scale(dtype, kernel_device):
    lengths = [1, 700, 2048, 33, 512]
    cu = cu_seqlens_from_lengths(lengths)
    total, heads, kv_heads, d, n, k = sum(lengths), 12, 2, 128, 2, 20
    q = torch.randn(total, heads, d, dtype=dtype)
    key, val = torch.randn(total, kv_heads, d, dtype=dtype), torch.randn(total, kv_heads, d, dtype=dtype)
    pk, pv = torch.randn(n, kv_heads, k, d, dtype=dtype), torch.randn(n, kv_heads, k, d, dtype=dtype)
    paths = torch.tensor([0, 1, 0, 1, 1])
    out = pdfkernels.prefix_attention_varlen(q, key, val, pk, pv, cu, max(lengths), paths)
    ref = reference.prefix_attention_varlen(*(t.double() for t in (q, key, val, pk, pv)), cu, max(lengths), paths)
    _close(out, ref, dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vclub_ops_at_scale(dtype, kernel_device):
    n, b, d = 2, 512, 512
    y = torch.randn(n, b, d) * 3
    mu = (y.roll(1, 0) + 0.3 * torch.randn(n, b, d)).to(dtype)
    logvar = (torch.rand(n, b, d) * 2 - 1).to(dtype)
    y = y.to(dtype)
    for op in ("mim_loss", "estimator_nll"):
        leaves = [t.detach().requires_grad_() for t in (y, mu, logvar)]
        loss = getattr(pdfkernels, op)(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        exact = [t.detach().double().requires_grad_() for t in (y, mu, logvar)]
        ref = getattr(reference, op)(*exact)
        ref_grads = torch.autograd.grad(ref, exact)
        _close(loss.reshape(1), ref.detach().reshape(1), dtype, op)
        for name, g, r in zip(("y", "mu", "logvar"), grads, ref_grads):
            _close(g, r, dtype, f"{op} d{name}")
    pairwise = pdfkernels.gaussian_loglik_pairwise(y[0], mu[1], logvar[1])
    ref = reference.gaussian_loglik_pairwise(y[0].double(), mu[1].double(), logvar[1].double())
    _close(pairwise, ref, dtype, "pairwise")


@pytest.mark.parametrize("tune", ["0", "1"], ids=["default-variant", "autotuned"])
def test_descriptor_kernels_on_hopper(tune, monkeypatch, kernel_device):
    """On sm_90 the padded layout takes the tensor-descriptor (TMA) kernels by default (the forward always
    ships one); autotuned, every shipped variant is timed once per key. Either way the answer is right."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    from pdfkernels import autotune
    from pdfkernels import prefix_attention_tma as tma_policy

    monkeypatch.setenv(settings.AUTOTUNE.name, tune)
    monkeypatch.setenv(settings.TMA.name, "auto")
    seen = []
    real = tma_policy.descriptors
    monkeypatch.setattr(tma_policy, "descriptors",
                        lambda kernel, p, t: seen.append((kernel.fn.__name__, p["TMA"])) or real(kernel, p, t))
    autotune.clear()
    dtype, b, length, heads, kv_heads, d, n, k = torch.bfloat16, 2, 2048, 12, 2, 128, 2, 20
    q = torch.randn(b, length, heads, d, dtype=dtype).transpose(1, 2)
    key = torch.randn(b, length, kv_heads, d, dtype=dtype).transpose(1, 2)
    val = torch.randn(b, length, kv_heads, d, dtype=dtype).transpose(1, 2)
    pk, pv = torch.randn(n, kv_heads, k, d, dtype=dtype), torch.randn(n, kv_heads, k, d, dtype=dtype)
    paths = torch.tensor([1, 0])
    leaves = [t.detach().requires_grad_() for t in (q, key, val, pk, pv)]
    out = pdfkernels.prefix_attention(*leaves, paths)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, upstream)
    exact = [t.detach().double().requires_grad_() for t in (q, key, val, pk, pv)]
    ref = reference.prefix_attention(*exact, paths)
    ref_grads = torch.autograd.grad(ref, exact, upstream.double())
    _close(out, ref.detach(), dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        _close(g, r, dtype, name)
    if tune == "0":
        assert ("prefix_attention_fwd_kernel", True) in seen
    else:
        timed = autotune.chosen()
        assert any(op == "prefix_attention_fwd_kernel" and len(v["times_ms"]) == 2 for (op, _), v in timed.items())
    autotune.clear()
