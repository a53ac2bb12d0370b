"""The Triton prefix-attention kernels (under the interpreter on a CPU) against the float64 reference.

Forward and all five gradients, fresh random inputs every run, kernel outputs poisoned with NaN first
(PDFKERNELS_POISON=1 in conftest) so that an element the kernels never write fails.
"""

import importlib

import pytest
import torch

import pdfkernels
from pdfkernels import reference, settings
from pdfkernels.packing import cu_seqlens_from_lengths, packed_to_padded, padded_to_packed


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch, kernel_device):
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    return kernel_device


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(ours).all(), f"{what}: non-finite (an unwritten element?)"
    tol = _tol(dtype)
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _padding_mask(b: int, length: int, side: str) -> torch.Tensor | None:
    if side == "none":
        return None
    real = torch.randint(1, length + 1, (b,))
    idx = torch.arange(length)[None]
    return idx >= (length - real)[:, None] if side == "left" else idx < real[:, None]


def _hf_layout(b, length, heads, d, dtype):
    """``[B, H, L, D]`` as Hugging Face passes it: the transpose of a ``[B, L, H, D]`` buffer."""
    return torch.randn(b, length, heads, d).to(dtype).transpose(1, 2)


def _check_grads(fn_ours, fn_ref, inputs, dtype):
    ours_in = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn_ours(*ours_in)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, ours_in, upstream)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = fn_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, upstream.double())
    assert out.dtype == dtype
    _assert_close(out, ref.detach(), dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == dtype, name
        _assert_close(g, r, dtype, name)
    return out


PADDED = [
    # b, heads, kv_heads, L, D, N, K, padding, causal, dtype
    (2, 2, 2, 1, 64, 1, 0, "none", True, torch.float32),
    (2, 4, 2, 7, 64, 2, 1, "left", True, torch.float32),
    (2, 12, 2, 64, 128, 2, 20, "left", True, torch.bfloat16),
    (2, 2, 2, 129, 64, 4, 33, "right", False, torch.float16),
    (1, 6, 1, 300, 64, 2, 20, "none", True, torch.bfloat16),
    (2, 4, 2, 129, 128, 1, 0, "right", True, torch.float32),
    (3, 12, 2, 7, 128, 4, 33, "left", False, torch.float16),
    (2, 4, 1, 20, 80, 2, 5, "right", True, torch.bfloat16),
    (2, 6, 6, 20, 96, 3, 20, "left", True, torch.float16),
    (2, 8, 1, 33, 64, 2, 64, "none", True, torch.float32),
]


@pytest.mark.parametrize("b,heads,kv_heads,length,d,n,k,padding,causal,dtype", PADDED,
                         ids=[f"L{c[3]}-K{c[6]}-N{c[5]}-G{c[1] // c[2]}-D{c[4]}-{c[7]}-{'causal' if c[8] else 'full'}"
                              f"-{str(c[9])[6:]}" for c in PADDED])
def test_padded_matches_reference(b, heads, kv_heads, length, d, n, k, padding, causal, dtype):
    out = check_padded_case(b, heads, kv_heads, length, d, n, k, padding, causal, dtype)
    assert out.transpose(1, 2).is_contiguous(), "the caller's transpose back must be free"


def check_padded_case(b, heads, kv_heads, length, d, n, k, padding, causal, dtype) -> torch.Tensor:
    """One padded case on fresh inputs in Hugging Face's layout: output and all five gradients against
    float64 (also run by the TMA tests)."""
    q = _hf_layout(b, length, heads, d, dtype)
    key, val = _hf_layout(b, length, kv_heads, d, dtype), _hf_layout(b, length, kv_heads, d, dtype)
    pk, pv = torch.randn(n, kv_heads, k, d).to(dtype), torch.randn(n, kv_heads, k, d).to(dtype)
    paths = torch.randint(0, n, (b,))
    mask = _padding_mask(b, length, padding)

    def ours(*t):
        return pdfkernels.prefix_attention(*t, paths, key_padding_mask=mask, causal=causal)

    def ref(*t):
        return reference.prefix_attention(*t, paths, key_padding_mask=mask, causal=causal)

    return _check_grads(ours, ref, [q, key, val, pk, pv], dtype)


VARLEN = [
    # lengths, heads, kv_heads, D, N, K, causal, dtype
    ([1, 17, 64, 5, 1, 40], 4, 2, 64, 3, 20, True, torch.float32),
    ([33, 1, 7], 12, 2, 128, 2, 20, False, torch.bfloat16),
    ([129, 2], 6, 1, 64, 4, 1, True, torch.float16),
    ([3, 9], 2, 2, 128, 1, 0, True, torch.float32),
]


@pytest.mark.parametrize("lengths,heads,kv_heads,d,n,k,causal,dtype", VARLEN,
                         ids=[f"S{len(c[0])}-K{c[5]}-G{c[1] // c[2]}-D{c[3]}-{str(c[7])[6:]}" for c in VARLEN])
def test_varlen_matches_reference(lengths, heads, kv_heads, d, n, k, causal, dtype):
    cu = cu_seqlens_from_lengths(lengths)
    total = sum(lengths)
    q = torch.randn(total, heads, d).to(dtype)
    key, val = torch.randn(total, kv_heads, d).to(dtype), torch.randn(total, kv_heads, d).to(dtype)
    pk, pv = torch.randn(n, kv_heads, k, d).to(dtype), torch.randn(n, kv_heads, k, d).to(dtype)
    paths = torch.randint(0, n, (len(lengths),))

    def ours(*t):
        return pdfkernels.prefix_attention_varlen(*t, cu, max(lengths), paths, causal=causal)

    def ref(*t):
        return reference.prefix_attention_varlen(*t, cu, max(lengths), paths, causal=causal)

    _check_grads(ours, ref, [q, key, val, pk, pv], dtype)


@pytest.mark.parametrize("left_padding", [False, True], ids=["right", "left"])
def test_varlen_equals_padded(left_padding):
    lengths, heads, kv_heads, d, n, k = [9, 1, 30, 4], 6, 2, 64, 3, 20
    cu = cu_seqlens_from_lengths(lengths)
    total = sum(lengths)
    packed = [torch.randn(total, heads, d), torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)]
    pk, pv = torch.randn(n, kv_heads, k, d), torch.randn(n, kv_heads, k, d)
    paths = torch.randint(0, n, (len(lengths),))
    out_packed = pdfkernels.prefix_attention_varlen(*packed, pk, pv, cu, max(lengths), paths)
    padded = [packed_to_padded(t, cu, max(lengths), left_padding)[0] for t in packed]
    mask = packed_to_padded(packed[0], cu, max(lengths), left_padding)[1]
    out_padded = pdfkernels.prefix_attention(*padded, pk, pv, paths, key_padding_mask=mask)
    torch.testing.assert_close(padded_to_packed(out_padded, mask), out_packed, rtol=1e-5, atol=1e-5)


def test_query_without_visible_key_is_zero_with_zero_gradients():
    q = torch.randn(1, 2, 6, 64, requires_grad=True)
    key, val = torch.randn(1, 1, 6, 64), torch.randn(1, 1, 6, 64)
    empty = torch.randn(1, 1, 0, 64)
    mask = torch.tensor([[False, False, True, True, True, True]])
    out = pdfkernels.prefix_attention(q, key, val, empty, empty, torch.tensor([0]), key_padding_mask=mask)
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))
    out.sum().backward()
    assert torch.equal(q.grad[0, :, :2], torch.zeros_like(q.grad[0, :, :2]))


def test_prefix_gradients_are_deterministic():
    b, heads, kv_heads, length, d, n, k = 4, 4, 2, 40, 64, 2, 20
    inputs = [torch.randn(b, heads, length, d), torch.randn(b, kv_heads, length, d),
              torch.randn(b, kv_heads, length, d), torch.randn(n, kv_heads, k, d), torch.randn(n, kv_heads, k, d)]
    paths = torch.tensor([0, 1, 1, 0])
    upstream = torch.randn(b, heads, length, d)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = pdfkernels.prefix_attention(*leaves, paths)
        runs.append(torch.autograd.grad(out, leaves[3:], upstream))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_contiguous_inputs_work_too():
    q, key, val = torch.randn(2, 4, 9, 64), torch.randn(2, 2, 9, 64), torch.randn(2, 2, 9, 64)
    pk, pv = torch.randn(2, 2, 3, 64), torch.randn(2, 2, 3, 64)
    paths = torch.tensor([1, 0])
    out = pdfkernels.prefix_attention(q, key, val, pk, pv, paths)
    ref = reference.prefix_attention(q, key, val, pk, pv, paths)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_float64_is_refused_on_the_triton_path():
    x = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    p = torch.randn(1, 2, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 runs on the PyTorch path"):
        pdfkernels.prefix_attention(x, x, x, p, p, torch.tensor([0]))


def test_prefix_gradients_over_several_row_chunks(monkeypatch):
    """dprefix is summed from one partial per chunk of query rows: force several chunks per sequence (and a
    partial last one), against the reference and bitwise across two runs."""
    monkeypatch.setattr(importlib.import_module("pdfkernels.prefix_attention"), "DPREFIX_CHUNK_ROWS", 64)
    b, heads, kv_heads, length, d, n, k = 2, 4, 2, 150, 64, 2, 20
    q, key, val = (_hf_layout(b, length, h, d, torch.float32) for h in (heads, kv_heads, kv_heads))
    pk, pv = torch.randn(n, kv_heads, k, d), torch.randn(n, kv_heads, k, d)
    paths = torch.tensor([1, 0])
    mask = _padding_mask(b, length, "left")

    def ours(*t):
        return pdfkernels.prefix_attention(*t, paths, key_padding_mask=mask)

    def ref(*t):
        return reference.prefix_attention(*t, paths, key_padding_mask=mask)

    _check_grads(ours, ref, [q, key, val, pk, pv], torch.float32)
    upstream = torch.randn(b, heads, length, d)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (q, key, val, pk, pv)]
        runs.append(torch.autograd.grad(ours(*leaves), leaves[3:], upstream))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "packed"])
def test_both_backends_share_one_lse_layout(varlen):
    """The kernels' and the PyTorch path's forwards give the log-sum-exp in one layout ([B, L, H] padded,
    [T, H] packed) with the same values, and either backward takes the other's: one layout, not two."""
    op = importlib.import_module("pdfkernels.prefix_attention")  # the module; the package exports the function
    torch_path = importlib.import_module("pdfkernels.prefix_attention_torch")

    b, heads, kv_heads, length, d, n, k = 2, 4, 2, 7, 16, 2, 3
    q, key, val = _hf_layout(b, length, heads, d, torch.float32), *(
        _hf_layout(b, length, kv_heads, d, torch.float32) for _ in range(2))
    pk, pv = torch.randn(n, kv_heads, k, d), torch.randn(n, kv_heads, k, d)
    paths, scale = torch.tensor([1, 0]), d ** -0.5
    if varlen:
        cu = cu_seqlens_from_lengths(torch.tensor([length, length - 2]))
        real = torch.arange(length)[None] < torch.tensor([[length], [length - 2]])
        q, key, val = (padded_to_packed(t, real) for t in (q, key, val))
        ours = op._triton_forward(q, key, val, pk, pv, paths, cu, None, length, True, scale, True)
        theirs = torch_path.forward_varlen(q, key, val, pk, pv, cu, paths, True, scale)
    else:
        ours = op._triton_forward(q, key, val, pk, pv, paths, None, None, length, True, scale, False)
        theirs = torch_path.forward(q, key, val, pk, pv, paths, None, True, scale)
    assert ours[1].shape == theirs[1].shape == op._fake_forward(q, varlen)[1].shape
    torch.testing.assert_close(ours[1], theirs[1].float(), rtol=1e-5, atol=1e-5)
    if not varlen:  # the PyTorch backward on the kernels' forward gives the PyTorch path's own gradients
        do = torch.randn_like(q)
        mixed = torch_path.backward(do, q, key, val, pk, pv, paths, None, ours[0], ours[1], True, scale)
        plain = torch_path.backward(do, q, key, val, pk, pv, paths, None, theirs[0], theirs[1], True, scale)
        for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), mixed, plain):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
