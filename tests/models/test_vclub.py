"""The VCLUB estimator module: architecture, the two-stage gradients, and agreement with the reference."""

import pytest
import torch

from pdfkernels import reference
from pdfkernels.models import VCLUB


def test_architecture_matches_appendix():
    m = VCLUB(16)
    assert [type(x).__name__ for x in m.mu] == ["Linear", "ReLU", "Linear"]
    assert [type(x).__name__ for x in m.logvar] == ["Linear", "ReLU", "Linear", "Tanh"]
    assert m.mu[0].out_features == 32 and m.mu[2].out_features == 16


def test_mim_loss_trains_embeddings_only():
    m = VCLUB(8).double()  # float64: the bound is a small difference of large terms, compared exactly
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    loss = m.mim_loss(h)
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    assert all(p.requires_grad for p in m.parameters())  # frozen only for the call
    mu, logvar = m(h.detach())
    assert loss.item() == pytest.approx(reference.mim_loss(h.detach(), mu, logvar).item(), rel=1e-9)


def test_estimator_loss_trains_estimator_only():
    m = VCLUB(8).double()
    h = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    loss = m.estimator_loss(h)
    loss.backward()
    assert h.grad is None
    assert all(p.grad is not None for p in m.parameters())
    mu, logvar = m(h.detach())
    assert loss.item() == pytest.approx(reference.estimator_nll(h.detach(), mu, logvar).item(), rel=1e-9)


def test_estimator_step_lowers_its_loss():
    torch.manual_seed(0)
    m = VCLUB(8)
    x = torch.randn(64, 8)
    h = torch.stack([x, 0.5 * x + 0.1 * torch.randn(64, 8)])  # dependent paths: the estimator can learn
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = m.estimator_loss(h).item()
    for _ in range(50):
        opt.zero_grad()
        m.estimator_loss(h).backward()
        opt.step()
    assert m.estimator_loss(h).item() < first - 1.0
    assert m.mim_loss(h).item() > 0  # a trained estimator sees the dependency


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match=r"'h' expected shape \[N, B, d=8\]"):
        VCLUB(8).mim_loss(torch.randn(5, 8))
