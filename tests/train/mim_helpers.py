"""A vCLUB estimator rigged to give a negative MI estimate, for the negative-MI warning tests."""

from __future__ import annotations

import torch

from pdfkernels.models import VCLUB


def anti_estimator(estimator: VCLUB) -> VCLUB:
    """Set mu(x) = -x exactly (ReLU(x) and ReLU(-x) recombined) and logvar = 0: the matched pair (h_k^i, h_k^j)
    of two positively correlated paths then scores worse than the mismatched ones, so Eq. 5 is negative."""
    eye = torch.eye(estimator.dim)
    first, second, last_logvar = estimator.mu[0], estimator.mu[2], estimator.logvar[2]
    with torch.no_grad():
        first.weight.copy_(torch.cat([eye, -eye]))
        second.weight.copy_(torch.cat([-eye, eye], dim=1))
        for layer in (first, second, last_logvar):
            layer.bias.zero_()
        last_logvar.weight.zero_()
    return estimator
