"""gaussian_loglik_pairwise (GEMM-form Triton kernel and PyTorch path) against the float64 reference."""

import pytest
import torch

import pdfkernels
from pdfkernels import reference, settings


@pytest.fixture(autouse=True)
def on_kernel_device(kernel_device):
    return kernel_device

CASES = [((2, 1), torch.float32), ((5, 7), torch.float32), ((64, 64), torch.float32), ((70, 100), torch.float32),
         ((257, 7), torch.float32), ((33, 1536), torch.float32), ((5, 7), torch.bfloat16), ((70, 64), torch.bfloat16),
         ((5, 7), torch.float16), ((70, 64), torch.float16)]


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s}-{str(t)[6:]}" for s, t in CASES])
def test_pairwise_and_gradients_match_reference(shape, dtype, use_triton, monkeypatch):
    b, d = shape
    y = (torch.randn(b, d) * 2 + 3).to(dtype)  # means away from zero: the centring is exercised
    mu = (torch.randn(b, d) + 3).to(dtype)
    logvar = (torch.rand(b, d) * 4 - 2).to(dtype)
    exact = [t.double().requires_grad_() for t in (y, mu, logvar)]
    ref = reference.gaussian_loglik_pairwise(*exact)
    upstream = torch.randn(b, b, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, exact, upstream)

    monkeypatch.setenv(settings.BACKEND.name, "triton" if use_triton else "torch")
    ours_in = [t.clone().requires_grad_() for t in (y, mu, logvar)]
    out = pdfkernels.gaussian_loglik_pairwise(*ours_in)
    grads = torch.autograd.grad(out, ours_in, upstream.to(dtype))
    assert out.shape == (b, b) and out.dtype == dtype
    # fp32 (ieee dots) for fp32 inputs; 16-bit inputs: one rounding of the output plus tf32 dots on GPUs
    rtol = 2e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=rtol * scale)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * r.abs().max().item())


def test_pairwise_is_consistent_with_mim_loss():
    y, mu, logvar = (torch.randn(2, 6, 5, dtype=torch.float64) for _ in range(3))
    b = y.shape[1]
    total = 0.0
    for i, j in ((0, 1), (1, 0)):
        p = pdfkernels.gaussian_loglik_pairwise(y[i], mu[j], logvar[j])
        total += (p.diagonal() - (p.sum(1) - p.diagonal()) / (b - 1)).mean()
    assert pdfkernels.mim_loss(y, mu, logvar).item() == pytest.approx(total.item() / 2, rel=1e-10)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_pairwise_accurate_where_the_gemm_form_cancels(use_triton, monkeypatch):
    """A trained estimator's positives: y ~ mu with |mu| ~ 30 and logvar = -10. The GEMM form alone lost all
    accuracy on the diagonal (relative error ~1); every entry must match float64 as a direct fp32 sum does."""
    b, d = 40, 64
    mu = torch.randn(b, d) * 30
    y = mu + torch.randn(b, d) * 1e-3
    logvar = torch.full((b, d), -10.0)
    ref = reference.gaussian_loglik_pairwise(y.double(), mu.double(), logvar.double())
    monkeypatch.setenv(settings.BACKEND.name, "triton" if use_triton else "torch")
    out = pdfkernels.gaussian_loglik_pairwise(y, mu, logvar)
    relative = (out.double() - ref).abs() / ref.abs()
    assert relative.max().item() < 1e-5, relative.diagonal().max().item()


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_pairwise_nan_in_mu_poisons_only_its_column(use_triton, monkeypatch):
    y, mu, logvar = torch.randn(9, 5) + 3, torch.randn(9, 5) + 3, torch.rand(9, 5) - 0.5
    mu[4, 2] = float("nan")
    monkeypatch.setenv(settings.BACKEND.name, "triton" if use_triton else "torch")
    out = pdfkernels.gaussian_loglik_pairwise(y, mu, logvar)
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[:, 4] = True
    assert torch.equal(torch.isnan(out), expected)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_pairwise_second_order_gradients_match_reference(use_triton, monkeypatch):
    """create_graph=True (a gradient penalty): the gradients are differentiable, also for strided inputs."""
    b, d = 6, 5
    base = [torch.randn(b, 2 * d) for _ in range(2)] + [torch.rand(b, 2 * d) - 0.5]
    upstream, vs = torch.randn(b, b, dtype=torch.float64), [torch.randn(b, d, dtype=torch.float64) for _ in range(3)]

    def hessian_vector(fn, inputs):
        grads = torch.autograd.grad((fn(*inputs) * upstream.to(inputs[0].dtype)).sum(), inputs, create_graph=True)
        assert all(g.requires_grad for g in grads)
        penalty = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(penalty, inputs)

    exact = [t[:, ::2].double().requires_grad_() for t in base]
    ref = hessian_vector(reference.gaussian_loglik_pairwise, exact)
    monkeypatch.setenv(settings.BACKEND.name, "triton" if use_triton else "torch")
    ours = [t.clone().requires_grad_() for t in base]
    got = hessian_vector(pdfkernels.gaussian_loglik_pairwise, [t[:, ::2] for t in ours])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
