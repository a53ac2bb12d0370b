"""The references against independent computations: SDPA on concatenated keys, loops, torch.distributions."""

import math

import pytest
import torch

from pdfkernels import reference, settings
from pdfkernels.baselines import cat_sdpa_prefix_attention, club_broadcast_mim
from pdfkernels.packing import cu_seqlens_from_lengths, packed_to_padded, padded_to_packed


def _padding_mask(b: int, length: int, side: str) -> torch.Tensor | None:
    if side == "none":
        return None
    real = torch.randint(1, length + 1, (b,))
    real[0] = length  # one full row
    idx = torch.arange(length)[None]
    return idx >= (length - real)[:, None] if side == "left" else idx < real[:, None]


def _attention_inputs(b, h, hkv, length, d, n, k, dtype=torch.float64):
    q = torch.randn(b, h, length, d, dtype=dtype)
    key, val = torch.randn(b, hkv, length, d, dtype=dtype), torch.randn(b, hkv, length, d, dtype=dtype)
    pk, pv = torch.randn(n, hkv, k, d, dtype=dtype), torch.randn(n, hkv, k, d, dtype=dtype)
    return q, key, val, pk, pv, torch.randint(0, n, (b,))


@pytest.mark.parametrize("b,h,hkv,length,d,n,k", [
    (2, 4, 4, 9, 16, 2, 3),     # MHA
    (3, 6, 2, 13, 8, 3, 5),     # GQA 3
    (2, 8, 1, 7, 16, 1, 20),    # MQA, one path
    (2, 4, 2, 11, 16, 2, 0),    # no prefix
    (4, 2, 1, 1, 8, 4, 2),      # L = 1
])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("causal", [True, False])
def test_prefix_attention_equals_cat_sdpa(b, h, hkv, length, d, n, k, padding, causal):
    q, key, val, pk, pv, paths = _attention_inputs(b, h, hkv, length, d, n, k)
    mask = _padding_mask(b, length, padding)
    scale = 0.3 if causal else None
    ours = reference.prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask, causal=causal,
                                      softmax_scale=scale)
    theirs = cat_sdpa_prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask, causal=causal,
                                       softmax_scale=scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_prefix_attention_gradients_equal_cat_sdpa():
    inputs = [t.requires_grad_() for t in _attention_inputs(2, 4, 2, 10, 8, 2, 3)[:5]]
    paths = torch.tensor([1, 0])
    mask = _padding_mask(2, 10, "left")
    grads = []
    upstream = torch.randn(2, 4, 10, 8, dtype=torch.float64)
    for fn in (reference.prefix_attention, cat_sdpa_prefix_attention):
        out = fn(*inputs, paths, key_padding_mask=mask)
        grads.append(torch.autograd.grad(out, inputs, upstream))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_query_with_no_visible_key_is_zero():
    q, key, val, pk, pv, paths = _attention_inputs(1, 2, 1, 6, 8, 1, 0)
    mask = torch.tensor([[False, False, True, True, True, True]])
    out = reference.prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask, causal=True)
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))
    assert out[0, :, 2:].abs().sum() > 0


def test_prefix_is_visible_to_every_query_and_selected_by_path():
    # One own key that is masked everywhere except itself: query 0 of a causal row sees prefix + key 0.
    q, key, val, pk, pv, _ = _attention_inputs(2, 2, 1, 4, 8, 2, 3)
    out0 = reference.prefix_attention(q, key, val, pk, pv, torch.tensor([0, 0]))
    out1 = reference.prefix_attention(q, key, val, pk, pv, torch.tensor([0, 1]))
    torch.testing.assert_close(out0[0], out1[0])
    assert not torch.allclose(out0[1], out1[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_returns_input_dtype_computed_in_fp32(dtype):
    q, key, val, pk, pv, paths = _attention_inputs(2, 4, 2, 9, 16, 2, 4, dtype=dtype)
    out = reference.prefix_attention(q, key, val, pk, pv, paths)
    assert out.dtype == dtype
    exact = reference.prefix_attention(*(t.double() for t in (q, key, val, pk, pv)), paths)
    torch.testing.assert_close(out.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("left_padding", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_equals_padded(left_padding, causal):
    lengths = [1, 9, 4, 13, 1]
    h, hkv, d, n, k = 6, 2, 8, 3, 4
    cu = cu_seqlens_from_lengths(lengths)
    total = sum(lengths)
    q = torch.randn(total, h, d, dtype=torch.float64)
    key, val = torch.randn(total, hkv, d, dtype=torch.float64), torch.randn(total, hkv, d, dtype=torch.float64)
    pk, pv = torch.randn(n, hkv, k, d, dtype=torch.float64), torch.randn(n, hkv, k, d, dtype=torch.float64)
    paths = torch.randint(0, n, (len(lengths),))
    packed = reference.prefix_attention_varlen(q, key, val, pk, pv, cu, max(lengths), paths, causal=causal)
    padded = [packed_to_padded(t, cu, max(lengths), left_padding)[0] for t in (q, key, val)]
    mask = packed_to_padded(q, cu, max(lengths), left_padding)[1]
    out = reference.prefix_attention(*padded, pk, pv, paths, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(packed, padded_to_packed(out, mask), rtol=1e-12, atol=1e-12)


# --- Gaussian log-likelihood -------------------------------------------------------------------------

def _loglik_loop(y, mu, logvar) -> float:
    """log N(y; mu, diag(exp(logvar))) by a Python loop over dimensions."""
    total = 0.0
    for yd, md, lv in zip(y.tolist(), mu.tolist(), logvar.tolist()):
        total += -0.5 * ((yd - md) ** 2 * math.exp(-lv) + lv + math.log(2 * math.pi))
    return total


def _gaussian_inputs(*shape):
    return (torch.randn(*shape, dtype=torch.float64) * 2, torch.randn(*shape, dtype=torch.float64),
            torch.randn(*shape, dtype=torch.float64))


def test_pairwise_equals_loops_and_normal():
    y, mu, logvar = _gaussian_inputs(5, 7)
    ours = reference.gaussian_loglik_pairwise(y, mu, logvar)
    loops = torch.tensor([[_loglik_loop(y[k], mu[m], logvar[m]) for m in range(5)] for k in range(5)],
                         dtype=torch.float64)
    normal = torch.distributions.Normal(mu[None], torch.exp(0.5 * logvar[None])).log_prob(y[:, None]).sum(-1)
    torch.testing.assert_close(ours, loops, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, normal, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,b,d", [(2, 2, 1), (3, 5, 4), (4, 3, 6)])
def test_mim_loss_equals_loops(n, b, d):
    y, mu, logvar = _gaussian_inputs(n, b, d)
    total = 0.0
    for k in range(b):
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                positive = _loglik_loop(y[i, k], mu[j, k], logvar[j, k])
                negative = sum(_loglik_loop(y[i, k], mu[j, m], logvar[j, m]) for m in range(b) if m != k) / (b - 1)
                total += positive - negative
    expected = total / (b * n * (n - 1))
    assert reference.mim_loss(y, mu, logvar).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert club_broadcast_mim(y, mu, logvar).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n,b,d", [(2, 1, 3), (3, 4, 5)])
def test_estimator_nll_equals_loops(n, b, d):
    y, mu, logvar = _gaussian_inputs(n, b, d)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    expected = -sum(_loglik_loop(y[i, k], mu[j, k], logvar[j, k]) for k in range(b) for i, j in pairs)
    expected /= b * len(pairs)
    assert reference.estimator_nll(y, mu, logvar).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gaussian_references_return_input_dtype(dtype):
    y, mu, logvar = (t.to(dtype) for t in _gaussian_inputs(3, 4, 8))
    assert reference.gaussian_loglik_pairwise(y[0], mu[0], logvar[0]).dtype == dtype
    assert reference.mim_loss(y, mu, logvar).dtype == dtype
    assert reference.estimator_nll(y, mu, logvar).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding,k", [("none", 0), ("left", 0), ("right", 3), ("left", 4)])
def test_public_torch_path_equals_reference(padding, k, dtype, monkeypatch):
    """The public op's PyTorch path (SDPA on concatenated keys) against the literal reference, with left
    padding and K = 0 giving queries that see no key at all (they must return zeros)."""
    import pdfkernels

    monkeypatch.setenv(settings.BACKEND.name, "torch")
    q, key, val, pk, pv, paths = (t.to(dtype) if t.is_floating_point() else t
                                  for t in _attention_inputs(3, 6, 2, 11, 16, 2, k))
    mask = _padding_mask(3, 11, padding)
    ours = pdfkernels.prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask)
    ref = reference.prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask)
    assert ours.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps  # both round fp32 results once
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
