"""mim_loss and estimator_nll (PyTorch closed form and Triton kernels) against the float64 reference."""

import pytest
import torch

import pdfkernels
from pdfkernels import reference, settings


@pytest.fixture(autouse=True)
def on_kernel_device(kernel_device):
    return kernel_device

SHAPES = [(2, 2, 1), (2, 5, 7), (3, 64, 64), (4, 257, 7), (2, 64, 1536), (3, 257, 64), (4, 5, 1536), (3, 2, 1536)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(n, b, d, dtype, y_scale=3.0, lv_scale=1.0, correlated=True):
    """Estimator outputs that predict the other path (as a trained estimator does), or unrelated ones."""
    y = torch.randn(n, b, d, dtype=torch.float64) * y_scale
    noise = torch.randn(n, b, d, dtype=torch.float64) * y_scale * 0.1
    mu = (y.roll(1, dims=0) + noise) if correlated else torch.randn(n, b, d, dtype=torch.float64) * y_scale
    logvar = (torch.rand(n, b, d, dtype=torch.float64) * 2 - 1) * lv_scale
    return tuple(t.to(dtype) for t in (y, mu, logvar))


def _reference_with_grads(fn, inputs):
    exact = [t.double().requires_grad_() for t in inputs]
    loss = fn(*exact)
    return loss.detach(), torch.autograd.grad(loss, exact)


def _ours_with_grads(fn, inputs, use_triton, monkeypatch):
    monkeypatch.setenv(settings.BACKEND.name, "triton" if use_triton else "torch")
    ours = [t.clone().requires_grad_() for t in inputs]
    for t in ours:
        t.grad = None
    loss = fn(*ours)
    return loss, torch.autograd.grad(loss, ours)


# every shape in fp32; 16-bit inputs on a subset of shapes to keep CI short
CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES
         if dtype == torch.float32 or shape[1:] in [(5, 7), (64, 64), (257, 7)]]


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s}-{str(t)[6:]}" for s, t in CASES])
@pytest.mark.parametrize("op", ["mim_loss", "estimator_nll"])
def test_loss_and_gradients_match_reference(op, shape, dtype, use_triton, monkeypatch):
    n, b, d = shape
    inputs = _inputs(n, b, d, dtype)
    ref_loss, ref_grads = _reference_with_grads(getattr(reference, op), inputs)
    loss, grads = _ours_with_grads(getattr(pdfkernels, op), inputs, use_triton, monkeypatch)
    assert loss.dtype == dtype and loss.shape == ()
    # fp32 accumulation, then one rounding to the input dtype
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert loss.double().item() == pytest.approx(ref_loss.item(), rel=rtol, abs=1e-6)
    for name, g, ref in zip(("y", "mu", "logvar"), grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        scale = ref.abs().max().item()
        torch.testing.assert_close(g.double(), ref, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("n,b,d", [(2, 64, 1536), (3, 257, 64)])
def test_mim_loss_accurate_for_large_values(n, b, d, use_triton, monkeypatch):
    """|y| up to 1e3 and |logvar| up to 10 in fp32: relative error <= 1e-5 against float64 on the same inputs."""
    inputs = _inputs(n, b, d, torch.float32, y_scale=300.0, lv_scale=10.0)
    ref_loss, _ = _reference_with_grads(reference.mim_loss, inputs)
    loss, _ = _ours_with_grads(pdfkernels.mim_loss, inputs, use_triton, monkeypatch)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_mim_loss_unrelated_inputs_error_bounded_by_term_scale(use_triton, monkeypatch):
    """With an uninformative estimator the bound is a near-cancellation of large terms; the error is then
    bounded relative to the positive term's magnitude (no fp32 evaluation does better relative to ~0)."""
    inputs = _inputs(3, 257, 64, torch.float32, y_scale=300.0, lv_scale=10.0, correlated=False)
    ref_loss, _ = _reference_with_grads(reference.mim_loss, inputs)
    loss, _ = _ours_with_grads(pdfkernels.mim_loss, inputs, use_triton, monkeypatch)
    y, mu, logvar = (t.double() for t in inputs)
    positive_scale = (torch.exp(-logvar) * (y.roll(1, 0) - mu).square()).sum(-1).mean().item()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * positive_scale


def test_mim_loss_memory_is_linear_in_batch(monkeypatch):
    """No [B, B] or [B, B, d] tensor: a batch whose broadcast would need 2 GB runs in a few MB of float32."""
    monkeypatch.setenv(settings.BACKEND.name, "torch")
    y, mu, logvar = (torch.randn(2, 4096, 32) for _ in range(3))  # broadcast: 4096*4096*32*4 B = 2 GiB
    loss = pdfkernels.mim_loss(y, mu, logvar)
    assert torch.isfinite(loss)


def test_triton_path_refuses_float64(monkeypatch):
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    y = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 runs on the PyTorch path"):
        pdfkernels.mim_loss(y, y, y)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("op", ["mim_loss", "estimator_nll"])
def test_second_order_gradients_match_reference(op, use_triton, monkeypatch):
    """create_graph=True (a gradient penalty): the gradients carry a graph and their own gradients (a
    Hessian-vector product, the statistics' dependence on the inputs included) match float64."""
    inputs = _inputs(3, 6, 5, torch.float32)
    vs = [torch.randn(3, 6, 5, dtype=torch.float64) for _ in range(3)]

    def hessian_vector(fn, tensors):
        grads = torch.autograd.grad(fn(*tensors), tensors, create_graph=True)
        assert all(g.requires_grad for g in grads)
        penalty = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(penalty, tensors)

    ref = hessian_vector(getattr(reference, op), [t.double().requires_grad_() for t in inputs])
    monkeypatch.setenv(settings.BACKEND.name, "triton" if use_triton else "torch")
    got = hessian_vector(getattr(pdfkernels, op), [t.clone().requires_grad_() for t in inputs])
    for name, g, r in zip(("y", "mu", "logvar"), got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
