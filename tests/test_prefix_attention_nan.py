"""A NaN in one path's sequences stays in that path's prefix gradients (issue 21, item 5): the other paths'
gradients match the float64 reference, which sums each path's rows only."""

import pytest
import torch

import pdfkernels
from pdfkernels import reference, settings
from tests.test_prefix_attention import _assert_close, _hf_layout


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_a_nan_in_one_path_leaves_the_other_paths_prefix_gradients_finite(monkeypatch, kernel_device, varlen):
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    b, heads, kv_heads, length, d, n, k, dtype = 3, 4, 2, 7, 64, 2, 3, torch.float32
    q = _hf_layout(b, length, heads, d, dtype)
    key, val = _hf_layout(b, length, kv_heads, d, dtype), _hf_layout(b, length, kv_heads, d, dtype)
    pk, pv = torch.randn(n, kv_heads, k, d), torch.randn(n, kv_heads, k, d)
    paths = torch.tensor([0, 1, 1])
    upstream = torch.randn(b, heads, length, d)
    upstream[0] = float("nan")  # sequence 0 (path 0) went non-finite
    if varlen:
        def flat(t):  # [B, H, L, D] -> packed [B * L, H, D]
            return t.transpose(1, 2).reshape(b * length, t.shape[1], d)
        cu = torch.arange(0, (b + 1) * length, length, dtype=torch.int32)
        q, key, val, upstream = flat(q), flat(key), flat(val), flat(upstream)

        def ours(*t):
            return pdfkernels.prefix_attention_varlen(*t, cu, length, paths)

        def ref(*t):
            return reference.prefix_attention_varlen(*t, cu, length, paths)
    else:
        def ours(*t):
            return pdfkernels.prefix_attention(*t, paths)

        def ref(*t):
            return reference.prefix_attention(*t, paths)
    inputs = [q, key, val, pk, pv]
    ours_in = [t.detach().clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(ours(*ours_in), ours_in, upstream)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(ref(*ref_in), ref_in, upstream.double())
    for name, g, r in zip(("dprefix_k", "dprefix_v"), grads[3:], ref_grads[3:]):
        assert torch.isfinite(r[1]).all() and not torch.isfinite(r[0]).all()  # the reference's verdict
        _assert_close(g[1], r[1], dtype, f"{name} of path 1")
        assert not torch.isfinite(g[0]).all(), f"{name} of path 0 lost its NaN"
