"""Gaussian log-likelihood ops for vCLUB: the pairwise matrix, the MIM loss (Eq. 5), the estimator loss.

Semantics are those of ``pdfkernels.reference``. Fused Triton kernels are tracked in the vCLUB issue;
until they land every device runs the reference, and asking for Triton explicitly is an error.
"""

from __future__ import annotations

import torch

from . import backend, reference
from .validation import check_gaussian


def _refuse_triton(op: str) -> None:
    if backend.requested() == "triton":
        raise NotImplementedError(f"{op}: no Triton kernel yet ({backend.ENV_VAR}=triton was set)")


def gaussian_loglik_pairwise(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: entry ``[k, m] = log N(y_k; mu_m, diag(exp(logvar_m)))`` from ``[B, d]`` inputs."""
    check_gaussian("gaussian_loglik_pairwise", y, mu, logvar, "[B, d]")
    _refuse_triton("gaussian_loglik_pairwise")
    return reference.gaussian_loglik_pairwise(y, mu, logvar)


def mim_loss(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The vCLUB MI upper bound of Eq. 5 from ``[N, B, d]`` inputs (N >= 2, B >= 2); a scalar."""
    check_gaussian("mim_loss", y, mu, logvar, "[N, B, d]", min_paths=2, min_batch=2)
    _refuse_triton("mim_loss")
    return reference.mim_loss(y, mu, logvar)


def estimator_nll(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The estimator's negative log-likelihood of Eq. 4 from ``[N, B, d]`` inputs (N >= 2); a scalar."""
    check_gaussian("estimator_nll", y, mu, logvar, "[N, B, d]", min_paths=2)
    _refuse_triton("estimator_nll")
    return reference.estimator_nll(y, mu, logvar)
