"""The ``[B, B]`` matrix of Gaussian log-likelihoods ``log N(y_k; mu_m, diag(exp(logvar_m)))`` in GEMM form.

With a per-dimension shift ``c`` (the mean of mu over samples; the matrix does not depend on it) and
``y' = y - c``, ``mu' = mu - c``, ``w = exp(-logvar)``:

    P = -1/2 [ (y'^2) @ w^T  -  2 y' @ (mu' w)^T  +  1 (sum_d mu'^2 w + logvar + log 2 pi)^T ]

so the matrix is two matrix products plus a column term: the kernel tiles the output like a GEMM and its
dots run on tensor cores (tf32 for 16-bit inputs, full fp32 for fp32 inputs). Centring keeps the expanded
square well conditioned when the means are far from zero; it cannot help when |y - mu| is tiny next to
the spread of mu, so use ``mim_loss`` (exact, linear memory) for the loss itself. The backward is three
matrix products in PyTorch (cuBLAS on GPUs) from the same centred operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backend
from .reference import LOG_2PI
from .registry import KernelConfig, configs_for, register
from .validation import check_gaussian

_TL_TYPES = backend.TRITON_TYPES


@triton.jit
def gaussian_pairwise_kernel(y_ptr, mu_ptr, logvar_ptr, shift_ptr, out_ptr, B, D,
                             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of P: rows are anchors y_k, columns conditioning samples m."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    col_term = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_K):
        ks = d0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        shift = tl.load(shift_ptr + ks, mask=k_ok, other=0.0)
        y_ok = (rows < B)[:, None] & k_ok[None, :]
        y = tl.load(y_ptr + rows[:, None] * D + ks[None, :], mask=y_ok, other=0.0).to(tl.float32)
        y = tl.where(y_ok, y - shift[None, :], 0.0)
        m_ok = (cols < B)[:, None] & k_ok[None, :]
        mu = tl.load(mu_ptr + cols[:, None] * D + ks[None, :], mask=m_ok, other=0.0).to(tl.float32)
        mu = tl.where(m_ok, mu - shift[None, :], 0.0)
        lv = tl.load(logvar_ptr + cols[:, None] * D + ks[None, :], mask=m_ok, other=0.0).to(tl.float32)
        w = tl.where(m_ok, tl.exp(-lv), 0.0)
        acc += tl.dot(y * y, tl.trans(w), input_precision=PRECISION)
        acc -= 2.0 * tl.dot(y, tl.trans(mu * w), input_precision=PRECISION)
        col_term += tl.sum(tl.where(m_ok, mu * mu * w + lv + 1.8378770664093453, 0.0), axis=1)  # log 2 pi
    out = -0.5 * (acc + col_term[None, :])
    ok = (rows < B)[:, None] & (cols < B)[None, :]
    tl.store(out_ptr + rows[:, None] * B + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


for _dtype, _t in _TL_TYPES.items():
    register(KernelConfig(
        gaussian_pairwise_kernel, _t,
        signature={"y_ptr": f"*{_t}", "mu_ptr": f"*{_t}", "logvar_ptr": f"*{_t}", "shift_ptr": "*fp32",
                   "out_ptr": f"*{_t}", "B": "i32", "D": "i32", "PRECISION": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        constexprs={"PRECISION": "ieee" if _dtype == torch.float32 else "tf32", "BLOCK_M": 64, "BLOCK_N": 64,
                    "BLOCK_K": 16 if _dtype == torch.float32 else 32},
        num_warps=8, num_stages=2, expect_wgmma=_dtype != torch.float32))


def _centred(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    y, mu, logvar = y.to(acc), mu.to(acc), logvar.to(acc)
    shift = mu.mean(0)
    return y - shift, mu - shift, logvar, torch.exp(-logvar), shift


def _pairwise_torch(y, mu, logvar) -> torch.Tensor:
    yc, muc, logvar, w, _ = _centred(y, mu, logvar)
    col = (muc.square() * w + logvar).sum(1) + y.shape[1] * LOG_2PI
    return (-0.5 * (yc.square() @ w.T - 2.0 * yc @ (muc * w).T + col[None, :])).to(y.dtype)


def _pairwise_triton(y, mu, logvar) -> torch.Tensor:
    b, d = y.shape
    (cfg,) = [c for c in configs_for(gaussian_pairwise_kernel) if c.variant == _TL_TYPES[y.dtype]]
    shift = mu.float().mean(0).contiguous()
    out = torch.full((b, b), float("nan"), dtype=y.dtype, device=y.device)
    grid = (triton.cdiv(b, cfg.constexprs["BLOCK_M"]), triton.cdiv(b, cfg.constexprs["BLOCK_N"]))
    gaussian_pairwise_kernel[grid](y, mu, logvar, shift, out, b, d, **cfg.constexprs, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
    return out


class _Pairwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mu, logvar, use_triton: bool):
        y, mu, logvar = y.contiguous(), mu.contiguous(), logvar.contiguous()
        ctx.save_for_backward(y, mu, logvar)
        return (_pairwise_triton if use_triton else _pairwise_torch)(y, mu, logvar)

    @staticmethod
    def backward(ctx, grad):
        y, mu, logvar = ctx.saved_tensors
        yc, muc, _, w, _ = _centred(y, mu, logvar)
        g = grad.to(yc.dtype)
        colsum = g.sum(0)[:, None]  # [B, 1] over anchors, per conditioning sample
        gt_y = g.T @ yc
        dy = -(yc * (g @ w) - g @ (muc * w))
        dmu = w * (gt_y - colsum * muc)
        dlogvar = 0.5 * w * (g.T @ yc.square() - 2.0 * muc * gt_y + colsum * muc.square()) - 0.5 * colsum
        return dy.to(y.dtype), dmu.to(mu.dtype), dlogvar.to(logvar.dtype), None


def gaussian_loglik_pairwise(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: entry ``[k, m] = log N(y_k; mu_m, diag(exp(logvar_m)))`` from ``[B, d]`` inputs, in y's
    dtype, differentiable in all three. For diagnostics and for weighting or sampling negatives."""
    check_gaussian("gaussian_loglik_pairwise", y, mu, logvar, "[B, d]")
    return _Pairwise.apply(y, mu, logvar, backend.use_triton_for("gaussian_loglik_pairwise", y))
