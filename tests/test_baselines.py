"""The benchmark peers of prefix attention agree with ``pdfkernels.reference`` (outputs and gradients), and each
names the SDPA backend that ran. flash-attn's call is checked through a double of its varlen function written
from its documented semantics (bottom-right causal, GQA by head groups); the real one where installed."""

import importlib.util

import pytest
import torch
from torch.nn.attention import SDPBackend

from pdfkernels import reference
from pdfkernels.baselines import (
    flash_attn_varlen_prefix_attention,
    sdpa_backends_run,
    sdpa_prefix_attention,
)
from pdfkernels.packing import cu_seqlens_from_lengths

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _padded(b, h, hkv, length, d, n, k, dtype=torch.float32):
    def make(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    return (make(b, h, length, d), make(b, hkv, length, d), make(b, hkv, length, d), make(n, hkv, k, d),
            make(n, hkv, k, d), torch.randint(0, n, (b,), device=DEVICE))


def _grads(fn, tensors, upstream):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2)])
def test_sdpa_prefix_attention_equals_reference(h, hkv, k, causal, shared_mask):
    q, key, val, pk, pv, paths = _padded(3, h, hkv, 17, 16, 2, k)
    upstream = torch.randn_like(q)

    def ours(*t):
        return sdpa_prefix_attention(*t, paths, causal=causal, shared_mask=shared_mask)

    def ref(*t):
        return reference.prefix_attention(*t, paths, causal=causal)

    out, grads = _grads(ours, (q, key, val, pk, pv), upstream)
    expected, expected_grads = _grads(ref, (q, key, val, pk, pv), upstream)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=5e-5)


def test_sdpa_prefix_attention_names_the_backend_it_was_forced_to():
    q, key, val, pk, pv, paths = _padded(2, 4, 2, 9, 16, 2, 3, dtype=torch.bfloat16 if CUDA else torch.float32)
    run = sdpa_backends_run(lambda: sdpa_prefix_attention(q, key, val, pk, pv, paths, backend=SDPBackend.MATH))
    assert run == ("math",)
    run = sdpa_backends_run(lambda: sdpa_prefix_attention(q, key, val, pk, pv, paths,
                                                          backend=SDPBackend.FLASH_ATTENTION))
    assert run == (("flash",) if CUDA else ("flash-cpu",))
    assert sdpa_backends_run(lambda: q + 1) == ()


def test_sdpa_prefix_attention_refuses_padding():
    q, key, val, pk, pv, paths = _padded(2, 4, 2, 9, 16, 2, 3)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="key_padding_mask"):
        sdpa_prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_mask", [False, True])
def test_sdpa_cudnn_prefix_attention_equals_reference(shared_mask):
    q, key, val, pk, pv, paths = _padded(2, 6, 2, 128, 128, 2, 20, dtype=torch.bfloat16)

    def call():
        return sdpa_prefix_attention(q, key, val, pk, pv, paths, backend=SDPBackend.CUDNN_ATTENTION,
                                     shared_mask=shared_mask)

    try:
        run = sdpa_backends_run(call)
    except RuntimeError as exc:  # this PyTorch / cuDNN cannot run the call: the benchmark skips it likewise
        pytest.skip(f"cuDNN SDPA refuses a bottom-right causal prefix: {exc}")
    if run != ("cudnn",):
        pytest.skip(f"forced cuDNN, but {run} ran (the bias dispatches to flash/efficient itself)")
    out = call()
    torch.testing.assert_close(out, reference.prefix_attention(q, key, val, pk, pv, paths), atol=2e-2, rtol=2e-2)


def _varlen_double(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's documented semantics, written plainly: per sequence, query head h reads key head
    h // (H / Hkv); with causal, query i sees key j when j <= i + (Lk - Lq) (bottom-right)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    for s in range(cu_q.numel() - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)  # [H, Lq, D]
        ks = k[cu_k[s]:cu_k[s + 1]].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[cu_k[s]:cu_k[s + 1]].transpose(0, 1).repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            lq, lk = qs.shape[1], ks.shape[1]
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out[cu_q[s]:cu_q[s + 1]] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_varlen_prefix_attention_equals_reference(causal):
    lengths, h, hkv, d, n, k = [5, 1, 0, 12, 7], 6, 2, 16, 2, 4
    total = sum(lengths)
    cu = cu_seqlens_from_lengths(lengths, device=DEVICE)
    tensors = (torch.randn(total, h, d, device=DEVICE), torch.randn(total, hkv, d, device=DEVICE),
               torch.randn(total, hkv, d, device=DEVICE), torch.randn(n, hkv, k, d, device=DEVICE),
               torch.randn(n, hkv, k, d, device=DEVICE))
    paths = torch.tensor([1, 0, 0, 1, 1], device=DEVICE)
    upstream = torch.randn_like(tensors[0])

    def ours(*t):
        return flash_attn_varlen_prefix_attention(*t, cu, max(lengths), paths, causal=causal,
                                                  varlen_fn=_varlen_double)

    def ref(*t):
        return reference.prefix_attention_varlen(*t, cu, max(lengths), paths, causal=causal)

    out, grads = _grads(ours, tensors, upstream)
    expected, expected_grads = _grads(ref, tensors, upstream)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    for g, e in zip(grads, expected_grads):  # the prefix gradients summed over the sequences of each path
        torch.testing.assert_close(g, e, atol=5e-5, rtol=5e-5)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_real_flash_attn_varlen_prefix_attention_equals_reference():
    lengths, h, hkv, d, n, k = [64, 17, 128], 6, 2, 128, 2, 20
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    total = sum(lengths)

    def make(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    q, key, val, pk, pv = make(total, h, d), make(total, hkv, d), make(total, hkv, d), make(n, hkv, k, d), \
        make(n, hkv, k, d)
    paths = torch.tensor([0, 1, 1], device="cuda")
    out = flash_attn_varlen_prefix_attention(q, key, val, pk, pv, cu, max(lengths), paths)
    expected = reference.prefix_attention_varlen(q, key, val, pk, pv, cu, max(lengths), paths)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
