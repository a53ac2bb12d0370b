"""The ``[B, B]`` matrix of Gaussian log-likelihoods ``log N(y_k; mu_m, diag(exp(logvar_m)))`` in GEMM form.

With a per-dimension shift ``c`` (the mean of the finite mu over samples; the matrix does not depend on it)
and ``y' = y - c``, ``mu' = mu - c``, ``w = exp(-logvar)``:

    P = -1/2 [ (y'^2) @ w^T  -  2 y' @ (mu' w)^T  +  1 (sum_d mu'^2 w + logvar + log 2 pi)^T ]

so the matrix is two matrix products plus a column term: the kernel tiles the output like a GEMM and its
dots run on tensor cores (tf32 for 16-bit inputs, full fp32 for fp32 inputs). Centring keeps the expanded
square well conditioned when the means are far from zero. It cannot help where y_k is close to mu_m next
to their size (a trained estimator's positives: y ~ mu, |mu| ~ 30, logvar ~ -10): there the terms cancel.
Their size is bounded from the products already made (Cauchy-Schwarz:
``sum_d w (|y'| + |mu'|)^2 <= (sqrt(sum_d w y'^2) + sqrt(sum_d w mu'^2))^2``, about twice the value for
unrelated pairs); every entry whose bound exceeds its value ``CANCEL``-fold is evaluated again directly,
``sum_d w (y - mu)^2`` on the uncentred inputs (usually O(B) entries, the diagonal). A NaN in mu_m
poisons column m only (the shift skips non-finite values). The backward is three matrix products in
PyTorch (cuBLAS on GPUs) from the same centred operands; it is differentiable (second-order gradients).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backend
from .reference import LOG_2PI
from .registry import KernelConfig, lookup, register
from .validation import check_gaussian

_TL_TYPES = backend.TRITON_TYPES


@triton.jit
def gaussian_pairwise_kernel(y_ptr, mu_ptr, logvar_ptr, shift_ptr, out_ptr, flag_ptr, B, D, cancel,
                             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of P: rows are anchors y_k, columns conditioning samples m. ``flag``
    marks the entries whose GEMM-form terms exceed their value ``cancel``-fold (evaluated again directly)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_sq = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # sum_d y'^2 w
    acc_cross = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # sum_d y' mu' w
    col_sq = tl.zeros([BLOCK_N], tl.float32)  # sum_d mu'^2 w
    col_lv = tl.zeros([BLOCK_N], tl.float32)
    col_lv_abs = tl.zeros([BLOCK_N], tl.float32)
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
        acc_sq += tl.dot(y * y, tl.trans(w), input_precision=PRECISION)
        acc_cross += tl.dot(y, tl.trans(mu * w), input_precision=PRECISION)
        col_sq += tl.sum(tl.where(m_ok, mu * mu * w, 0.0), axis=1)
        col_lv += tl.sum(tl.where(m_ok, lv, 0.0), axis=1)
        col_lv_abs += tl.sum(tl.where(m_ok, tl.abs(lv), 0.0), axis=1)
    log_2pi = D * 1.8378770664093453
    quad = acc_sq - 2.0 * acc_cross + col_sq[None, :]
    out = -0.5 * (quad + (col_lv + log_2pi)[None, :])
    root = tl.sqrt(acc_sq) + tl.sqrt(col_sq)[None, :]
    bound = root * root
    flag = bound > cancel * (tl.abs(quad) + (col_lv_abs + log_2pi)[None, :])
    ok = (rows < B)[:, None] & (cols < B)[None, :]
    here = rows[:, None] * B + cols[None, :]
    tl.store(out_ptr + here, out.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(flag_ptr + here, flag.to(tl.int8), mask=ok)


def _register_configs() -> None:
    for dtype, t in _TL_TYPES.items():
        register(KernelConfig(
            gaussian_pairwise_kernel, t, key=(t,),
            signature={"y_ptr": f"*{t}", "mu_ptr": f"*{t}", "logvar_ptr": f"*{t}", "shift_ptr": "*fp32",
                       "out_ptr": f"*{t}", "flag_ptr": "*i8", "B": "i32", "D": "i32", "cancel": "fp32",
                       "PRECISION": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            # fp32 (ieee dots on CUDA cores): 32-row tiles keep 16-wide K steps spill-free; Triton 3.6 (the GPU
            # machines) refuses dots with K < 16
            constexprs={"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                        "BLOCK_M": 32 if dtype == torch.float32 else 64, "BLOCK_N": 64,
                        "BLOCK_K": 16 if dtype == torch.float32 else 32},
            num_warps=8, num_stages=2, expect_wgmma=dtype != torch.float32))


_register_configs()


# an entry whose GEMM-form terms exceed its value this many times (3 bits lost) is evaluated directly
CANCEL = 8.0


def _shift(mu: torch.Tensor) -> torch.Tensor:
    """Per-dimension mean of the finite mu (0 where none is): one NaN in mu_m must not reach other columns."""
    finite = torch.isfinite(mu)
    return torch.where(finite, mu, 0).sum(0) / finite.sum(0).clamp(min=1)


def _centred(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    acc = backend.accumulate_dtype(y)
    y, mu, logvar = y.to(acc), mu.to(acc), logvar.to(acc)
    shift = _shift(mu)
    return y - shift, mu - shift, logvar, torch.exp(-logvar), shift


def _evaluate_directly(out: torch.Tensor, flags: torch.Tensor, y, mu, logvar) -> None:
    """Overwrite the flagged entries of ``out`` with ``sum_d [w (y - mu)^2 + logvar + log 2 pi]`` on the
    uncentred inputs (one rounding per difference), a bounded number of rows at a time."""
    pairs = flags.nonzero()
    if pairs.numel() == 0:
        return
    acc, d = backend.accumulate_dtype(y), y.shape[1]
    step = max(1, (1 << 16) // d)
    for start in range(0, pairs.shape[0], step):
        k, m = pairs[start:start + step].unbind(1)
        lv = logvar[m].to(acc)
        terms = (y[k].to(acc) - mu[m].to(acc)).square() * torch.exp(-lv) + lv
        out[k, m] = (-0.5 * (terms.sum(1) + d * LOG_2PI)).to(out.dtype)


def _pairwise_torch(y, mu, logvar) -> torch.Tensor:
    yc, muc, logvar_acc, w, _ = _centred(y, mu, logvar)
    d = y.shape[1]
    col_sq = (muc.square() * w).sum(1)
    sq = yc.square() @ w.T
    quad = sq - 2.0 * yc @ (muc * w).T + col_sq[None, :]
    out = -0.5 * (quad + (logvar_acc.sum(1) + d * LOG_2PI)[None, :])
    bound = (sq.sqrt() + col_sq.sqrt()[None, :]).square()
    flags = bound > CANCEL * (quad.abs() + (logvar_acc.abs().sum(1) + d * LOG_2PI)[None, :])
    _evaluate_directly(out, flags, y, mu, logvar)
    return out.to(y.dtype)


def _pairwise_triton(y, mu, logvar) -> torch.Tensor:
    b, d = y.shape
    cfg = lookup(gaussian_pairwise_kernel, (_TL_TYPES[y.dtype],))[0]
    shift = _shift(mu.float()).contiguous()
    out = backend.new_output(y, (b, b))
    flags = torch.zeros((b, b), dtype=torch.int8, device=y.device)
    grid = (triton.cdiv(b, cfg.constexprs["BLOCK_M"]), triton.cdiv(b, cfg.constexprs["BLOCK_N"]))
    gaussian_pairwise_kernel[grid](y, mu, logvar, shift, out, flags, b, d, CANCEL, **cfg.constexprs,
                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _evaluate_directly(out, flags.bool(), y, mu, logvar)
    return out


@torch.library.custom_op("pdfkernels::gaussian_loglik_pairwise", mutates_args=())
def _pairwise_op(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The registered op (torch.compile, CUDA graphs). Its Triton path re-evaluates the flagged entries, whose
    number it reads on the host: no CUDA-graph capture of this op (torch.compile is fine: the op is opaque)."""
    y, mu, logvar = y.contiguous(), mu.contiguous(), logvar.contiguous()
    use_triton = backend.use_triton_for("gaussian_loglik_pairwise", y)
    return (_pairwise_triton if use_triton else _pairwise_torch)(y, mu, logvar)


@_pairwise_op.register_fake
def _(y, mu, logvar):
    return y.new_empty((y.shape[0], y.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # the inputs themselves: a double backward differentiates them


def _backward(ctx, grad):
    """Three matrix products in PyTorch ops (differentiable: second-order gradients), traced by the compiler."""
    y, mu, logvar = ctx.saved_tensors
    yc, muc, _, w, _ = _centred(y, mu, logvar)
    g = grad.to(yc.dtype)
    colsum = g.sum(0)[:, None]  # [B, 1] over anchors, per conditioning sample
    gt_y = g.T @ yc
    dy = -(yc * (g @ w) - g @ (muc * w))
    dmu = w * (gt_y - colsum * muc)
    dlogvar = 0.5 * w * (g.T @ yc.square() - 2.0 * muc * gt_y + colsum * muc.square()) - 0.5 * colsum
    return dy.to(y.dtype), dmu.to(mu.dtype), dlogvar.to(logvar.dtype)


_pairwise_op.register_autograd(_backward, setup_context=_setup_context)


def gaussian_loglik_pairwise(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: entry ``[k, m] = log N(y_k; mu_m, diag(exp(logvar_m)))`` from ``[B, d]`` inputs, in y's
    dtype, differentiable in all three. For diagnostics and for weighting or sampling negatives. The op
    underneath is ``torch.ops.pdfkernels.gaussian_loglik_pairwise``."""
    check_gaussian("gaussian_loglik_pairwise", y, mu, logvar, "[B, d]")
    backend.use_triton_for("gaussian_loglik_pairwise", y)  # a dtype the kernels do not take is refused here
    return torch.ops.pdfkernels.gaussian_loglik_pairwise(y, mu, logvar)
