"""The registered ops (``torch.ops.pdfkernels.*``): ``torch.library.opcheck`` on the PyTorch path (schema, fake
implementation against the real one, registered autograd), and ``torch.compile(fullgraph=True)`` of each public
op on the CPU (backend ``eager``: Dynamo's tracing; ``aot_eager``: the fake implementations and the registered
backward traced too), forward and backward equal to eager, with value checks still on."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import pdfkernels
import pdfkernels.reference
from pdfkernels import settings


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv(settings.BACKEND.name, "torch")  # the PyTorch path (CPU's default), also under TRITON_INTERPRET
    torch._dynamo.reset()


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _attention_inputs(dtype=torch.float32):
    q = _leaf(3, 4, 7, 16, dtype=dtype)
    k, v = _leaf(3, 2, 7, 16, dtype=dtype), _leaf(3, 2, 7, 16, dtype=dtype)
    pk, pv = _leaf(2, 2, 3, 16, dtype=dtype), _leaf(2, 2, 3, 16, dtype=dtype)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[2, 5:] = False  # right padding
    return q, k, v, pk, pv, torch.tensor([1, 0, 1]), mask


def _varlen_inputs(dtype=torch.float32):
    q, k = _leaf(11, 4, 16, dtype=dtype), _leaf(11, 2, 16, dtype=dtype)
    v = _leaf(11, 2, 16, dtype=dtype)
    pk, pv = _leaf(2, 2, 3, 16, dtype=dtype), _leaf(2, 2, 3, 16, dtype=dtype)
    return q, k, v, pk, pv, torch.tensor([0, 4, 4, 11], dtype=torch.int32), 7, torch.tensor([1, 0, 1])


def _gaussian(n: int | None, dtype=torch.float32):
    shape = (5, 8) if n is None else (n, 5, 8)
    return _leaf(*shape, dtype=dtype), _leaf(*shape, dtype=dtype), _leaf(*shape, dtype=dtype)


def test_opcheck_passes_for_every_op(dtype=torch.float32):
    q, k, v, pk, pv, ids, mask = _attention_inputs(dtype)
    # the [B, H, L, D] transpose of a [B, L, H, D] buffer, as Hugging Face passes q
    q_hf = torch.randn(3, 7, 4, 16, dtype=dtype).transpose(1, 2).requires_grad_()
    tq, tk, tv, tpk, tpv, cu, max_len, seq_ids = _varlen_inputs(dtype)
    y3, mu3, lv3 = _gaussian(3, dtype)
    y2, mu2, lv2 = _gaussian(None, dtype)
    ops = torch.ops.pdfkernels
    cases = [
        (ops.prefix_attention, (q, k, v, pk, pv, ids, mask, True, 0.25)),
        (ops.prefix_attention, (q_hf, k, v, pk, pv, ids, None, True, 0.25)),
        (ops.prefix_attention, (q, k, v, pk[:, :, :0], pv[:, :, :0], ids, mask, False, 0.25)),
        (ops.prefix_attention_varlen, (tq, tk, tv, tpk, tpv, cu, max_len, seq_ids, True, 0.25)),
        (ops.mim_loss, (y3, mu3, lv3)),
        (ops.estimator_nll, (y3, mu3, lv3)),
        (ops.gaussian_loglik_pairwise, (y2, mu2, lv2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _compiled(fn, backend_name: str):
    return torch.compile(fn, backend=backend_name, fullgraph=True)


def _grads(out, inputs, upstream):
    return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad],
                               upstream)


def _public_cases():
    q, k, v, pk, pv, ids, mask = _attention_inputs()
    tq, tk, tv, tpk, tpv, cu, max_len, seq_ids = _varlen_inputs()
    y3, mu3, lv3 = _gaussian(3)
    y2, mu2, lv2 = _gaussian(None)
    return {
        "prefix_attention": (lambda *t: pdfkernels.prefix_attention(*t[:6], key_padding_mask=t[6]),
                             (q, k, v, pk, pv, ids, mask)),
        "prefix_attention_varlen": (pdfkernels.prefix_attention_varlen, (tq, tk, tv, tpk, tpv, cu, max_len, seq_ids)),
        "mim_loss": (pdfkernels.mim_loss, (y3, mu3, lv3)),
        "estimator_nll": (pdfkernels.estimator_nll, (y3, mu3, lv3)),
        "gaussian_loglik_pairwise": (pdfkernels.gaussian_loglik_pairwise, (y2, mu2, lv2)),
    }


# aot_eager: Dynamo's trace (what backend "eager" checks) plus the fake implementations and registered backward
@pytest.mark.parametrize("backend_name", ["aot_eager"])
@pytest.mark.parametrize("name", list(_public_cases()))
def test_each_op_compiles_without_graph_breaks_and_equals_eager(name, backend_name):
    fn, inputs = _public_cases()[name]
    expected = fn(*inputs)
    got = _compiled(fn, backend_name)(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(expected)
    for g, e in zip(_grads(got, inputs, upstream), _grads(expected, inputs, upstream)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_value_checks_stay_on_under_compile():
    """Out-of-range path ids and bad offsets raise inside a compiled region (device-side asserts), and with the
    named error in eager mode."""
    q, k, v, pk, pv, ids, mask = _attention_inputs()
    bad = torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match="path_ids.*expected values in \\[0, N=2\\)"):
        pdfkernels.prefix_attention(q, k, v, pk, pv, bad)
    attention = _compiled(lambda *t: pdfkernels.prefix_attention(*t), "aot_eager")
    attention(q, k, v, pk, pv, ids)
    with pytest.raises(RuntimeError, match="path_ids.*expected values in \\[0, N=2\\)"):
        attention(q, k, v, pk, pv, bad)
    tq, tk, tv, tpk, tpv, cu, max_len, seq_ids = _varlen_inputs()
    varlen = _compiled(pdfkernels.prefix_attention_varlen, "aot_eager")
    varlen(tq, tk, tv, tpk, tpv, cu, max_len, seq_ids)
    for offsets, message in (([0, 6, 4, 11], "non-decreasing"), ([0, 4, 4, 10], "end at T=11"),
                             ([1, 4, 4, 11], "start at 0")):
        with pytest.raises(RuntimeError, match=message):
            varlen(tq, tk, tv, tpk, tpv, torch.tensor(offsets, dtype=torch.int32), max_len, seq_ids)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        varlen(tq, tk, tv, tpk, tpv, cu, 6, seq_ids)


def test_second_order_gradients_through_the_ops():
    """create_graph=True still gives differentiable gradients on the PyTorch path (a gradient penalty); small
    float64 inputs (gradgradcheck differentiates numerically per element)."""
    q = torch.randn(2, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(2, 1, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ids, mask = torch.tensor([1, 0]), torch.tensor([[False, True, True, True], [True] * 4])
    assert torch.autograd.gradgradcheck(lambda *t: pdfkernels.prefix_attention(*t, ids, key_padding_mask=mask),
                                        (q, k, v, pk, pv))
    y, mu, lv = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(pdfkernels.mim_loss, (y, mu, lv))


def test_opcheck_on_the_interpreted_triton_kernels(monkeypatch):
    """The same checks with the Triton kernels (under TRITON_INTERPRET on a CPU: the real launchers, fake
    implementations against them; small shapes, the interpreter is slow)."""
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    q, k, v, pk, pv, ids, mask = _attention_inputs()
    tq, tk, tv, tpk, tpv, cu, max_len, seq_ids = _varlen_inputs()
    y3, mu3, lv3 = _gaussian(2)
    y2, mu2, lv2 = _gaussian(None)
    ops = torch.ops.pdfkernels
    for op, args in [(ops.prefix_attention, (q, k, v, pk, pv, ids, mask, True, 0.25)),
                     (ops.prefix_attention_varlen, (tq, tk, tv, tpk, tpv, cu, max_len, seq_ids, True, 0.25)),
                     (ops.mim_loss, (y3, mu3, lv3)), (ops.estimator_nll, (y3, mu3, lv3)),
                     (ops.gaussian_loglik_pairwise, (y2, mu2, lv2))]:
        torch.library.opcheck(op, args)


def test_a_nan_in_one_path_stays_in_that_paths_prefix_gradients():
    """The PyTorch path sums each path's rows by selection: a NaN upstream in a path-0 row leaves path 1's
    prefix gradients equal to the float64 reference's (a one-hot product would spread 0 * NaN)."""
    q, k, v, pk, pv, _, _ = _attention_inputs()
    ids = torch.tensor([0, 1, 1])
    upstream = torch.randn(q.shape)
    upstream[0] = float("nan")
    grads = torch.autograd.grad(pdfkernels.prefix_attention(q, k, v, pk, pv, ids), (pk, pv), upstream)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = torch.autograd.grad(pdfkernels.reference.prefix_attention(*exact, ids), exact[3:], upstream.double())
    for g, r in zip(grads, ref):
        assert not torch.isfinite(g[0]).all()
        torch.testing.assert_close(g[1].double(), r[1], rtol=1e-5, atol=1e-5)
