"""CUDA only (``pytest -m gpu``): the registered ops on the Triton kernels under ``torch.library.opcheck``, the
default inductor backend, and a CUDA-graph capture of a forward + backward with autotuning warmed up."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import pdfkernels
from pdfkernels import autotune

pytestmark = pytest.mark.gpu


def _attention(dtype=torch.bfloat16, b=2, length=256, heads=8, kv_heads=2, d=128, n=2, k=20):
    q = torch.randn(b, length, heads, d, dtype=dtype).transpose(1, 2).requires_grad_()  # Hugging Face's layout
    key = torch.randn(b, length, kv_heads, d, dtype=dtype).transpose(1, 2).requires_grad_()
    val = torch.randn(b, length, kv_heads, d, dtype=dtype).transpose(1, 2).requires_grad_()
    pk = torch.randn(n, kv_heads, k, d, dtype=dtype, requires_grad=True)
    pv = torch.randn(n, kv_heads, k, d, dtype=dtype, requires_grad=True)
    mask = torch.arange(length)[None] >= torch.tensor([0, length // 3])[:, None]  # left padding on row 1
    return (q, key, val, pk, pv), torch.tensor([1, 0]), mask


def test_opcheck_on_the_triton_kernels(kernel_device):
    (q, k, v, pk, pv), ids, mask = _attention(torch.float32, length=64, d=64)
    y, mu, lv = (torch.randn(2, 16, 64, requires_grad=True) for _ in range(3))
    ops = torch.ops.pdfkernels
    for op, args in [(ops.prefix_attention, (q, k, v, pk, pv, ids, mask, True, 0.125)),
                     (ops.mim_loss, (y, mu, lv)), (ops.estimator_nll, (y, mu, lv)),
                     (ops.gaussian_loglik_pairwise, (y[0], mu[0], lv[0]))]:
        torch.library.opcheck(op, args)


def test_inductor_compiles_the_ops_and_equals_eager(kernel_device):
    torch._dynamo.reset()
    leaves, ids, mask = _attention()

    def step(*t):
        return pdfkernels.prefix_attention(*t, ids, key_padding_mask=mask).float().square().mean()

    expected = torch.autograd.grad(step(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(step, fullgraph=True)(*leaves), leaves)
    for g, e in zip(got, expected):  # the same kernels; inductor's square/mean may round the upstream differently
        torch.testing.assert_close(g, e)
    y, mu, lv = (torch.randn(2, 64, 256, requires_grad=True) for _ in range(3))
    loss = torch.compile(lambda *t: pdfkernels.mim_loss(*t) + pdfkernels.estimator_nll(*t), fullgraph=True)
    torch.testing.assert_close(loss(y, mu, lv), pdfkernels.mim_loss(y, mu, lv) + pdfkernels.estimator_nll(y, mu, lv))


def test_cuda_graph_capture_of_forward_and_backward(kernel_device):
    leaves, ids, mask = _attention()
    upstream = torch.randn_like(leaves[0])

    def step():
        out = pdfkernels.prefix_attention(*leaves, ids, key_padding_mask=mask)
        return torch.autograd.grad(out, leaves, upstream)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: the first eager call per launch key tunes
            step()
    torch.cuda.current_stream().wait_stream(side)
    tuned = autotune.chosen()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    assert autotune.chosen() == tuned  # nothing was timed during the capture
    for t in leaves:  # new values in the same buffers
        t.data.copy_(torch.randn_like(t))
    upstream.copy_(torch.randn_like(upstream))
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip(captured, step()):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_reduce_overhead_compile_of_a_training_step(kernel_device):
    torch._dynamo.reset()
    leaves, ids, mask = _attention(torch.float16)

    def step(*t):
        return pdfkernels.prefix_attention(*t, ids, key_padding_mask=mask).float().square().mean()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # eager warm-up (tunes), then capture, then replay
        got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(step(*leaves), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
