"""The vCLUB mutual-information estimator q(y | x) of the paper's appendix A.2, built on pdfkernels' ops."""

from __future__ import annotations

import torch
from torch import nn

import pdfkernels


class VCLUB(nn.Module):
    """Gaussian q(h_i | h_j) = N(mu(h_j), diag(exp(logvar(h_j)))) with
    mu: Linear(d, hidden) -> ReLU -> Linear(hidden, d) and logvar: the same followed by Tanh.

    ``hidden`` defaults to 2d as in the paper's A.2 formulas (its text also mentions 4d; pass it to change).
    The two-stage step: ``estimator_loss(h)`` trains the estimator on detached embeddings (Eq. 4), then
    ``mim_loss(h)`` gives the backbone's MIM term (Eq. 5) with the estimator frozen: gradients reach h only.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = 2 * dim if hidden is None else hidden
        self.dim = dim
        self.mu = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.logvar = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Tanh())

    def _check(self, h: torch.Tensor) -> None:
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[-1] != self.dim:
            shape = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"VCLUB: argument 'h' expected shape [N, B, d={self.dim}], got {shape}")

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of q(. | h) for every path, each ``[N, B, d]``, in the module's dtype."""
        return self.mu(h), self.logvar(h)

    def estimator_loss(self, h: torch.Tensor) -> torch.Tensor:
        """Eq. 4 on detached embeddings ``h [N, B, d]``: gradients reach the estimator only."""
        self._check(h)
        h = h.detach()
        mu, logvar = self(h)
        return pdfkernels.estimator_nll(h.to(mu.dtype), mu, logvar)

    def mim_loss(self, h: torch.Tensor, group=None) -> torch.Tensor:
        """Eq. 5 with the estimator frozen: gradients reach ``h [N, B, d]`` only (through y and through the
        conditioning mu(h_j), logvar(h_j)), never the estimator's weights."""
        self._check(h)
        params = list(self.parameters())
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            mu, logvar = self(h)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        return pdfkernels.mim_loss(h.to(mu.dtype), mu, logvar, group=group)
