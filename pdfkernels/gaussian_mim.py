"""vCLUB's MIM loss (Eq. 5) and the estimator's loss (Eq. 4) in linear memory, exactly.

For an ordered path pair (i, j) and anchor k write, per dimension, ``w = exp(-logvar)`` and

    A_k = sum_d [ w_jk (y_ik - mu_jk)^2 + logvar_jk ]                      (the positive pair)
    C_k = sum_d sum_m [ w_jm (y_ik - mu_jm)^2 + logvar_jm ]                 (all B conditioning samples)
        = sum_d [ W_j (y_ik - Mbar_j)^2 + S2_j + LV_j ]

with the per-path, per-dimension statistics ``W = sum_m w_m``, ``Mbar = sum_m w_m mu_m / W`` (weighted
mean), ``S2 = sum_m w_m (mu_m - Mbar)^2`` and ``LV = sum_m logvar_m``. Centring on the weighted mean keeps
both terms non-negative, so nothing cancels in an expanded square. Then, exactly,

    L_MIM = s * sum_{i != j} sum_k [ alpha A_k + beta C_k ],  alpha = -B / (2 (B-1)),  beta = 1 / (2 (B-1))
    L_est = s * sum_{i != j} sum_k [ A_k / 2 ] + d log(2 pi) / 2,            s = 1 / (B N (N-1))

(the leave-one-out mean over m != k is C - A). Gradients are elementwise given the statistics above and,
for each path j, the count, mean and centred sum of squares of the anchors y of the *other* paths.

Kernels: a statistics pass (grid: path x dimension block), a per-anchor pass that reduces each program's
rows to one partial (summed on the host in a fixed order: deterministic, no atomics), and an elementwise
backward. Everything accumulates in fp32 whatever the input dtype. With a process group the statistics of
every rank are gathered (O(world * N * d) floats, never the embeddings), so the negatives span all ranks'
samples and each rank's gradients are the exact gradients of the global loss with respect to its inputs.
Second-order gradients (``create_graph=True``) differentiate the same closed form evaluated with autograd,
in one process (``_differentiable_grads``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from . import backend
from .reference import LOG_2PI
from .registry import KernelConfig, lookup, register
from .validation import check_gaussian

_TL_TYPES = backend.TRITON_TYPES


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def mim_stats_kernel(y_ptr, mu_ptr, logvar_ptr, stats_ptr, B, D,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per path p and dimension block: W, Mbar, S2, LV of (mu, logvar) and mean, centred M2 of y.

    stats is fp32 ``[6, N, D]``; rows are merged block by block with Chan's pairwise update."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w_sum = tl.zeros([BLOCK_D], tl.float32)
    m_bar = tl.zeros([BLOCK_D], tl.float32)
    s2 = tl.zeros([BLOCK_D], tl.float32)
    lv_sum = tl.zeros([BLOCK_D], tl.float32)
    y_mean = tl.zeros([BLOCK_D], tl.float32)
    y_m2 = tl.zeros([BLOCK_D], tl.float32)
    n_old = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        ok = (rows < B)[:, None] & col_ok[None, :]
        offs = p * B * D + rows[:, None] * D + cols[None, :]
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        lv = tl.load(logvar_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w = tl.where(ok, tl.exp(-lv), 0.0)
        # weighted statistics of mu within the block, then merged into the running ones
        wb = tl.sum(w, axis=0)
        mb = tl.sum(w * mu, axis=0) / tl.maximum(wb, 1e-30)
        s2b = tl.sum(w * tl.where(ok, (mu - mb[None, :]) * (mu - mb[None, :]), 0.0), axis=0)
        w_new = w_sum + wb
        delta = mb - m_bar
        frac = wb / tl.maximum(w_new, 1e-30)
        m_bar = m_bar + delta * frac
        s2 = s2 + s2b + delta * delta * w_sum * frac
        w_sum = w_new
        lv_sum += tl.sum(lv, axis=0)
        # unweighted statistics of y
        nb = tl.sum(tl.where(ok, 1.0, 0.0), axis=0)
        ybm = tl.sum(y, axis=0) / tl.maximum(nb, 1.0)
        ybm2 = tl.sum(tl.where(ok, (y - ybm[None, :]) * (y - ybm[None, :]), 0.0), axis=0)
        n_new = tl.maximum(n_old + nb, 1.0)
        dy = ybm - y_mean
        y_mean = y_mean + dy * nb / n_new
        y_m2 = y_m2 + ybm2 + dy * dy * n_old * nb / n_new
        n_old = n_old + nb
    n_paths = tl.num_programs(0)
    out = stats_ptr + p * D + cols
    plane = n_paths * D
    tl.store(out, w_sum, mask=col_ok)
    tl.store(out + plane, m_bar, mask=col_ok)
    tl.store(out + 2 * plane, s2, mask=col_ok)
    tl.store(out + 3 * plane, lv_sum, mask=col_ok)
    tl.store(out + 4 * plane, y_mean, mask=col_ok)
    tl.store(out + 5 * plane, y_m2, mask=col_ok)


@triton.jit
def mim_forward_kernel(y_ptr, mu_ptr, logvar_ptr, stats_ptr, partial_ptr, N, B, D, alpha, beta,
                       USE_STATS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """One partial per (anchor path i, row block): sum over rows k and paths j != i of
    alpha * A_k + beta * C_k (C only when USE_STATS)."""
    i = tl.program_id(0)
    rb = tl.program_id(1)
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for j in range(0, N):
        if j != i:
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                ok = row_ok[:, None] & col_ok[None, :]
                y = tl.load(y_ptr + i * B * D + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
                y = y.to(tl.float32)
                own = j * B * D + rows[:, None] * D + cols[None, :]
                mu = tl.load(mu_ptr + own, mask=ok, other=0.0).to(tl.float32)
                lv = tl.load(logvar_ptr + own, mask=ok, other=0.0).to(tl.float32)
                diff = y - mu
                term = alpha * (tl.exp(-lv) * diff * diff + lv)
                if USE_STATS:
                    plane = N * D
                    s = stats_ptr + j * D + cols
                    w_sum = tl.load(s, mask=col_ok, other=0.0)
                    m_bar = tl.load(s + plane, mask=col_ok, other=0.0)
                    rest = tl.load(s + 2 * plane, mask=col_ok, other=0.0) + tl.load(s + 3 * plane, mask=col_ok,
                                                                                     other=0.0)
                    dm = y - m_bar[None, :]
                    term += beta * (w_sum[None, :] * dm * dm + rest[None, :])
                acc += tl.where(ok, term, 0.0)
    tl.store(partial_ptr + i * tl.num_programs(1) + rb, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def mim_backward_kernel(y_ptr, mu_ptr, logvar_ptr, stats_ptr, others_ptr, grad_out_ptr,
                        dy_ptr, dmu_ptr, dlogvar_ptr, N, B, D, alpha, beta, others_count,
                        USE_STATS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Elementwise gradients for path p, rows and dimensions of this block.

    others is fp32 ``[2, N, D]``: mean and centred M2 of the anchors y of every path except p (all ranks)."""
    p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = (rows < B)[:, None] & col_ok[None, :]
    here = rows[:, None] * D + cols[None, :]
    g = tl.load(grad_out_ptr).to(tl.float32)
    y_p = tl.load(y_ptr + p * B * D + here, mask=ok, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_ptr + p * B * D + here, mask=ok, other=0.0).to(tl.float32)
    lv_p = tl.load(logvar_ptr + p * B * D + here, mask=ok, other=0.0).to(tl.float32)
    w_p = tl.exp(-lv_p)
    dy = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    sum_diff = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)  # sum_{i != p} (y_i - mu_p)
    sum_sq = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)  # sum_{i != p} (y_i - mu_p)^2
    n_others = 0.0
    plane = N * D
    for q in range(0, N):
        if q != p:
            # p as the anchor path, q as the conditioning path
            mu_q = tl.load(mu_ptr + q * B * D + here, mask=ok, other=0.0).to(tl.float32)
            w_q = tl.exp(-tl.load(logvar_ptr + q * B * D + here, mask=ok, other=0.0).to(tl.float32))
            dy += 2.0 * alpha * w_q * (y_p - mu_q)
            if USE_STATS:
                w_sum = tl.load(stats_ptr + q * D + cols, mask=col_ok, other=0.0)
                m_bar = tl.load(stats_ptr + plane + q * D + cols, mask=col_ok, other=0.0)
                dy += 2.0 * beta * w_sum[None, :] * (y_p - m_bar[None, :])
            # q as the anchor path, p as the conditioning path
            y_q = tl.load(y_ptr + q * B * D + here, mask=ok, other=0.0).to(tl.float32)
            diff = y_q - mu_p
            sum_diff += diff
            sum_sq += diff * diff
            n_others += 1.0
    dmu = -2.0 * alpha * w_p * sum_diff
    dlv = alpha * (n_others - w_p * sum_sq)
    if USE_STATS:
        o_mean = tl.load(others_ptr + p * D + cols, mask=col_ok, other=0.0)
        o_m2 = tl.load(others_ptr + plane + p * D + cols, mask=col_ok, other=0.0)
        centre = o_mean[None, :] - mu_p
        dmu += -2.0 * beta * w_p * others_count * centre
        dlv += beta * (others_count - w_p * (o_m2[None, :] + others_count * centre * centre))
    out = p * B * D + here
    tl.store(dy_ptr + out, (g * dy).to(dy_ptr.dtype.element_ty), mask=ok)
    tl.store(dmu_ptr + out, (g * dmu).to(dmu_ptr.dtype.element_ty), mask=ok)
    tl.store(dlogvar_ptr + out, (g * dlv).to(dlogvar_ptr.dtype.element_ty), mask=ok)


def _register_configs() -> None:
    for t in _TL_TYPES.values():
        ptrs = {"y_ptr": f"*{t}", "mu_ptr": f"*{t}", "logvar_ptr": f"*{t}"}
        register(KernelConfig(mim_stats_kernel, t, key=(t,), signature={
            **ptrs, "stats_ptr": "*fp32", "B": "i32", "D": "i32", "BLOCK_B": "constexpr", "BLOCK_D": "constexpr"},
            constexprs={"BLOCK_B": 32, "BLOCK_D": 128}, num_warps=4, num_stages=2))
        for use_stats in (True, False):
            label = f"{t} {'mim' if use_stats else 'estimator'}"
            register(KernelConfig(mim_forward_kernel, label, key=(t, use_stats), signature={
                **ptrs, "stats_ptr": "*fp32", "partial_ptr": "*fp32", "N": "i32", "B": "i32", "D": "i32",
                "alpha": "fp32", "beta": "fp32", "USE_STATS": "constexpr", "BLOCK_B": "constexpr",
                "BLOCK_D": "constexpr"},
                constexprs={"USE_STATS": use_stats, "BLOCK_B": 16, "BLOCK_D": 128}, num_warps=4, num_stages=2))
            register(KernelConfig(mim_backward_kernel, label, key=(t, use_stats), signature={
                **ptrs, "stats_ptr": "*fp32", "others_ptr": "*fp32", "grad_out_ptr": "*fp32",
                "dy_ptr": f"*{t}", "dmu_ptr": f"*{t}", "dlogvar_ptr": f"*{t}", "N": "i32", "B": "i32", "D": "i32",
                "alpha": "fp32", "beta": "fp32", "others_count": "fp32", "USE_STATS": "constexpr",
                "BLOCK_B": "constexpr", "BLOCK_D": "constexpr"},
                constexprs={"USE_STATS": use_stats, "BLOCK_B": 16, "BLOCK_D": 64}, num_warps=4, num_stages=2))


_register_configs()


def _config(kernel, dtype: torch.dtype, use_stats: bool | None = None) -> KernelConfig:
    """The registered configuration of one launch (each key has one: nothing to tune)."""
    key = (_TL_TYPES[dtype],) if use_stats is None else (_TL_TYPES[dtype], use_stats)
    return lookup(kernel, key)[0]


# ---------------------------------------------------------------------------------------------------
# Statistics (Triton or PyTorch), merged across ranks
# ---------------------------------------------------------------------------------------------------

@dataclass
class PathStats:
    """fp32 ``[N, D]`` per-path statistics over ``count`` samples (all ranks once merged)."""

    w_sum: torch.Tensor
    m_bar: torch.Tensor
    s2: torch.Tensor
    lv_sum: torch.Tensor
    y_mean: torch.Tensor
    y_m2: torch.Tensor
    count: int

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.w_sum, self.m_bar, self.s2, self.lv_sum, self.y_mean, self.y_m2])


def _row_chunks(b: int, d: int, elements: int = 1 << 16):
    """Row slices of about ``elements`` values per path: the PyTorch path's temporaries stay O(N d)-sized."""
    rows = max(1, elements // max(d, 1))
    return [slice(r, min(r + rows, b)) for r in range(0, b, rows)]


def _stats_torch(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> PathStats:
    """Statistics of each row chunk, merged with the same update the kernel and the ranks use."""
    acc = backend.accumulate_dtype(y)
    merged = None
    for rows in _row_chunks(y.shape[1], y.shape[2]):
        yc, muc, lvc = y[:, rows].to(acc), mu[:, rows].to(acc), logvar[:, rows].to(acc)
        w = torch.exp(-lvc)
        w_sum = w.sum(1)
        m_bar = (w * muc).sum(1) / w_sum
        s2 = (w * (muc - m_bar[:, None]).square()).sum(1)
        y_mean = yc.mean(1)
        y_m2 = (yc - y_mean[:, None]).square().sum(1)
        chunk = PathStats(w_sum, m_bar, s2, lvc.sum(1), y_mean, y_m2, yc.shape[1])
        merged = chunk if merged is None else _merge_two(merged, chunk)
    return merged


def _stats_triton(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> PathStats:
    n, b, d = y.shape
    stats = backend.new_output(y, (6, n, d), torch.float32)
    cfg = _config(mim_stats_kernel, y.dtype)
    block_d = cfg.constexprs["BLOCK_D"]
    mim_stats_kernel[(n, triton.cdiv(d, block_d))](y, mu, logvar, stats, b, d, **cfg.constexprs,
                                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return PathStats(*stats.unbind(0), count=b)


def _merge_two(a: PathStats, b: PathStats) -> PathStats:
    """Chan's pairwise merge of two disjoint sample sets (stable: no expanded squares)."""
    w_sum = a.w_sum + b.w_sum
    frac = b.w_sum / w_sum
    delta = b.m_bar - a.m_bar
    s2 = a.s2 + b.s2 + delta.square() * a.w_sum * frac
    count = a.count + b.count
    dy = b.y_mean - a.y_mean
    y_m2 = a.y_m2 + b.y_m2 + dy.square() * (a.count * b.count / count)
    return PathStats(w_sum, a.m_bar + delta * frac, s2, a.lv_sum + b.lv_sum, a.y_mean + dy * (b.count / count),
                     y_m2, count)


def _gather_stats(local: PathStats, group) -> PathStats:
    """Merge every rank's statistics in rank order (the same result on every rank)."""
    world = dist.get_world_size(group)
    packed = local.stacked().contiguous()
    pieces = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(pieces, packed, group=group)
    counts = [torch.zeros(1, dtype=torch.int64, device=packed.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.count], dtype=torch.int64, device=packed.device), group=group)
    merged = None
    for piece, count in zip(pieces, counts):
        stats = PathStats(*piece.unbind(0), count=int(count.item()))
        merged = stats if merged is None else _merge_two(merged, stats)
    return merged


def _others_stats(stats: PathStats) -> tuple[torch.Tensor, int]:
    """For each path j: mean and centred M2 of the anchors y of all paths except j, ``[2, N, D]``."""
    n = stats.y_mean.shape[0]
    rows = []
    for j in range(n):
        others = [i for i in range(n) if i != j]
        mean = stats.y_mean[others].mean(0)  # equal counts per path
        m2 = stats.y_m2[others].sum(0) + stats.count * (stats.y_mean[others] - mean).square().sum(0)
        rows.append(torch.stack([mean, m2]))
    return torch.stack(rows, dim=1).contiguous(), (n - 1) * stats.count


# ---------------------------------------------------------------------------------------------------
# Forward and backward in PyTorch (the CPU default), the same formulas as the kernels
# ---------------------------------------------------------------------------------------------------

def _forward_torch(y, mu, logvar, stats: PathStats | None, alpha: float, beta: float) -> torch.Tensor:
    n, b, d = y.shape
    acc = backend.accumulate_dtype(y)
    total = torch.zeros((), dtype=acc, device=y.device)
    for rows in _row_chunks(b, d):
        for i in range(n):
            yi = y[i, rows].to(acc)
            for j in range(n):
                if i == j:
                    continue
                lv = logvar[j, rows].to(acc)
                term = alpha * (torch.exp(-lv) * (yi - mu[j, rows].to(acc)).square() + lv)
                if stats is not None:  # combined per element, as in the kernel, before any sum
                    term += beta * (stats.w_sum[j] * (yi - stats.m_bar[j]).square() + stats.s2[j] + stats.lv_sum[j])
                total += term.sum()
    return total


def _backward_torch(y, mu, logvar, stats: PathStats | None, others: torch.Tensor | None, others_count: int,
                    alpha: float, beta: float, grad_out: torch.Tensor):
    """The kernel's elementwise formulas, a row chunk at a time, written straight into the gradients."""
    n, b, d = y.shape
    acc = backend.accumulate_dtype(y)
    g = grad_out.to(acc)
    dy, dmu, dlv = torch.empty_like(y), torch.empty_like(mu), torch.empty_like(logvar)
    for rows in _row_chunks(b, d):
        yc, muc, wc = y[:, rows].to(acc), mu[:, rows].to(acc), torch.exp(-logvar[:, rows].to(acc))
        for p in range(n):
            grad_y = torch.zeros_like(yc[p])
            sum_diff = torch.zeros_like(yc[p])  # sum over the other paths q of (y_q - mu_p)
            sum_sq = torch.zeros_like(yc[p])
            for q in range(n):
                if q == p:
                    continue
                grad_y += 2 * alpha * wc[q] * (yc[p] - muc[q])
                if stats is not None:
                    grad_y += 2 * beta * stats.w_sum[q] * (yc[p] - stats.m_bar[q])
                diff = yc[q] - muc[p]
                sum_diff += diff
                sum_sq += diff.square()
            grad_mu = -2 * alpha * wc[p] * sum_diff
            grad_lv = alpha * ((n - 1) - wc[p] * sum_sq)
            if stats is not None:
                centre = others[0, p] - muc[p]
                grad_mu -= 2 * beta * others_count * wc[p] * centre
                grad_lv += beta * (others_count - wc[p] * (others[1, p] + others_count * centre.square()))
            dy[p, rows] = g * grad_y
            dmu[p, rows] = g * grad_mu
            dlv[p, rows] = g * grad_lv
    return dy, dmu, dlv


# ---------------------------------------------------------------------------------------------------
# Launchers and the autograd function
# ---------------------------------------------------------------------------------------------------

def _forward_triton(y, mu, logvar, stats: PathStats | None, alpha: float, beta: float) -> torch.Tensor:
    n, b, d = y.shape
    cfg = _config(mim_forward_kernel, y.dtype, stats is not None)
    block_b = cfg.constexprs["BLOCK_B"]
    partial = backend.new_output(y, (n, triton.cdiv(b, block_b)), torch.float32)
    packed = stats.stacked() if stats is not None else partial  # unused when USE_STATS is False
    mim_forward_kernel[partial.shape](y, mu, logvar, packed, partial, n, b, d, alpha, beta, **cfg.constexprs,
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return partial.sum()


def _backward_triton(y, mu, logvar, stats: PathStats | None, others: torch.Tensor | None, others_count: int,
                     alpha: float, beta: float, grad_out: torch.Tensor):
    n, b, d = y.shape
    cfg = _config(mim_backward_kernel, y.dtype, stats is not None)
    grads = [backend.new_output(t) for t in (y, mu, logvar)]
    packed = stats.stacked() if stats is not None else grad_out
    others = others if others is not None else grad_out
    grid = (n, triton.cdiv(b, cfg.constexprs["BLOCK_B"]), triton.cdiv(d, cfg.constexprs["BLOCK_D"]))
    mim_backward_kernel[grid](y, mu, logvar, packed, others, grad_out.float().contiguous(), *grads, n, b, d,
                              alpha, beta, float(others_count), **cfg.constexprs, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages)
    return tuple(grads)


def _coefficients(term: str, n: int, total_batch: int, d: int) -> tuple[float, float, float]:
    """(alpha, beta, constant) so that loss = s * sum(alpha A + beta C) + constant."""
    s = 1.0 / (total_batch * n * (n - 1))
    if term == "mim":
        return -0.5 * total_batch / (total_batch - 1) * s, 0.5 / (total_batch - 1) * s, 0.0
    return 0.5 * s, 0.0, 0.5 * d * LOG_2PI


class _GaussianPathLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mu, logvar, term: str, group, use_triton: bool):
        n, b, d = y.shape
        ctx.save_for_backward(y, mu, logvar)  # the inputs themselves: a double backward differentiates them
        y, mu, logvar = y.contiguous(), mu.contiguous(), logvar.contiguous()
        stats = others = None
        others_count = 0
        total_batch = b
        if term == "mim":
            stats = (_stats_triton if use_triton else _stats_torch)(y, mu, logvar)
            if group is not None:
                stats = _gather_stats(stats, group)
            total_batch = stats.count
            others, others_count = _others_stats(stats)
        alpha, beta, constant = _coefficients(term, n, total_batch, d)
        forward = _forward_triton if use_triton else _forward_torch
        loss = forward(y, mu, logvar, stats, alpha, beta)
        if group is not None:
            dist.all_reduce(loss, group=group)
        ctx.stats, ctx.others, ctx.others_count = stats, others, others_count
        ctx.alpha, ctx.beta, ctx.use_triton, ctx.term, ctx.group = alpha, beta, use_triton, term, group
        return (loss + constant).to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        y, mu, logvar = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return (*_differentiable_grads(ctx, y, mu, logvar, grad_out), None, None, None)
        y, mu, logvar = y.contiguous(), mu.contiguous(), logvar.contiguous()
        backward = _backward_triton if ctx.use_triton else _backward_torch
        grads = backward(y, mu, logvar, ctx.stats, ctx.others, ctx.others_count, ctx.alpha, ctx.beta,
                         grad_out.reshape(1))
        return (*grads, None, None, None)


def _differentiable_grads(ctx, y, mu, logvar, grad_out) -> list[torch.Tensor | None]:
    """Second-order gradients (``create_graph=True``, e.g. a gradient penalty): the first-order gradients as a
    graph, by differentiating the same closed form evaluated with autograd (statistics included, which the
    first-order formulas treat as given). O(N B d) memory; any device; never under torch.distributed, where
    the statistics of the other ranks are constants to this rank's graph."""
    if ctx.group is not None:
        raise RuntimeError("mim_loss: second-order gradients (create_graph=True) are not supported under "
                           "torch.distributed (the other ranks' statistics enter as constants); compute them "
                           "without a process group")
    inputs = [t for t, need in zip((y, mu, logvar), ctx.needs_input_grad[:3]) if need]
    with torch.enable_grad():
        stats = _stats_torch(y, mu, logvar) if ctx.term == "mim" else None
        loss = _forward_torch(y, mu, logvar, stats, ctx.alpha, ctx.beta)
        grads = iter(torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype), create_graph=True))
    return [next(grads) if need else None for need in ctx.needs_input_grad[:3]]


# ---------------------------------------------------------------------------------------------------
# Registered ops (one process): what torch.compile traces and CUDA graphs capture. Under torch.distributed the
# statistics are exchanged between ranks, which stays in the autograd function above (eager only).
# ---------------------------------------------------------------------------------------------------

_OP_NAMES = {"mim": "mim_loss", "estimator": "estimator_nll"}


def _local_loss(y, mu, logvar, term: str):
    """(loss in y's dtype, stats [6, N, d] or None, others [2, N, d] or None) on this process's samples."""
    n, b, d = y.shape
    use_triton = backend.use_triton_for(_OP_NAMES[term], y)
    y, mu, logvar = y.contiguous(), mu.contiguous(), logvar.contiguous()
    stats = others = None
    if term == "mim":
        stats = (_stats_triton if use_triton else _stats_torch)(y, mu, logvar)
        others, _ = _others_stats(stats)
    alpha, beta, constant = _coefficients(term, n, b, d)
    loss = (_forward_triton if use_triton else _forward_torch)(y, mu, logvar, stats, alpha, beta)
    return (loss + constant).to(y.dtype), stats, others


def _local_grads(grad_out, y, mu, logvar, stats, others, term: str):
    n, b, d = y.shape
    use_triton = backend.use_triton_for(_OP_NAMES[term], y)
    y, mu, logvar = y.contiguous(), mu.contiguous(), logvar.contiguous()
    path_stats = PathStats(*stats.unbind(0), count=b) if stats is not None else None
    alpha, beta, _ = _coefficients(term, n, b, d)
    backward = _backward_triton if use_triton else _backward_torch
    return tuple(backward(y, mu, logvar, path_stats, others, (n - 1) * b, alpha, beta, grad_out.reshape(1)))


@torch.library.custom_op("pdfkernels::mim_loss", mutates_args=())
def _mim_loss_op(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    loss, stats, others = _local_loss(y, mu, logvar, "mim")
    return loss, stats.stacked(), others


@_mim_loss_op.register_fake
def _(y, mu, logvar):
    n, _, d = y.shape
    dtype = backend.accumulate_dtype(y)
    return y.new_empty(()), y.new_empty((6, n, d), dtype=dtype), y.new_empty((2, n, d), dtype=dtype)


@torch.library.custom_op("pdfkernels::mim_loss_backward", mutates_args=())
def _mim_loss_backward_op(grad_out: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                          stats: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    return _local_grads(grad_out, y, mu, logvar, stats, others, "mim")


@_mim_loss_backward_op.register_fake
def _(grad_out, y, mu, logvar, stats, others):
    return y.new_empty(y.shape), mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


@torch.library.custom_op("pdfkernels::estimator_nll", mutates_args=())
def _estimator_nll_op(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return _local_loss(y, mu, logvar, "estimator")[0]


@_estimator_nll_op.register_fake
def _(y, mu, logvar):
    return y.new_empty(())


@torch.library.custom_op("pdfkernels::estimator_nll_backward", mutates_args=())
def _estimator_nll_backward_op(grad_out: torch.Tensor, y: torch.Tensor, mu: torch.Tensor,
                               logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _local_grads(grad_out, y, mu, logvar, None, None, "estimator")


@_estimator_nll_backward_op.register_fake
def _(grad_out, y, mu, logvar):
    return y.new_empty(y.shape), mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


def _setup(term: str):
    def setup_context(ctx, inputs, output):
        y, mu, logvar = inputs
        n, b, d = y.shape
        saved = (y, mu, logvar, *output[1:]) if term == "mim" else (y, mu, logvar)
        ctx.save_for_backward(*saved)
        ctx.term, ctx.group = term, None
        ctx.alpha, ctx.beta, _ = _coefficients(term, n, b, d)
    return setup_context


def _mim_backward(ctx, grad_out, _dstats, _dothers):
    y, mu, logvar, stats, others = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
        return tuple(_differentiable_grads(ctx, y, mu, logvar, grad_out))
    return torch.ops.pdfkernels.mim_loss_backward(grad_out, y, mu, logvar, stats, others)


def _estimator_backward(ctx, grad_out):
    y, mu, logvar = ctx.saved_tensors
    if torch.is_grad_enabled():
        return tuple(_differentiable_grads(ctx, y, mu, logvar, grad_out))
    return torch.ops.pdfkernels.estimator_nll_backward(grad_out, y, mu, logvar)


_mim_loss_op.register_autograd(_mim_backward, setup_context=_setup("mim"))
_estimator_nll_op.register_autograd(_estimator_backward, setup_context=_setup("estimator"))


def _resolve_group(group):
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def mim_loss(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *, group=None) -> torch.Tensor:
    """The vCLUB MI upper bound of Eq. 5 from ``[N, B, d]`` inputs (N >= 2, B >= 2), a scalar in y's dtype.

    ``mu[j], logvar[j]`` are the estimator applied to path j. Exact over all ordered path pairs and all
    B^2 sample pairs in O(N^2 B d) time and O(N d) extra memory. When ``torch.distributed`` is initialised
    (or ``group`` is given) the negatives span every rank's samples: the value is the loss on the union
    batch, and each rank's gradients are the exact gradients of it with respect to that rank's inputs
    (summed over ranks they give the union batch's; a reducer that averages needs a factor world size).
    Deterministic: no atomics; partial sums are reduced in a fixed order."""
    check_gaussian("mim_loss", y, mu, logvar, "[N, B, d]", min_paths=2, min_batch=2)
    group = _resolve_group(group)
    if group is None:  # the registered op (torch.compile, CUDA graphs)
        return torch.ops.pdfkernels.mim_loss(y, mu, logvar)[0]
    return _GaussianPathLoss.apply(y, mu, logvar, "mim", group, backend.use_triton_for("mim_loss", y))


def estimator_nll(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The estimator's loss of Eq. 4 from ``[N, B, d]`` inputs (N >= 2): the mean over samples and ordered
    path pairs i != j of ``-log q(y[i,k] | mu[j,k], logvar[j,k])``. Local to this rank's samples."""
    check_gaussian("estimator_nll", y, mu, logvar, "[N, B, d]", min_paths=2)
    return torch.ops.pdfkernels.estimator_nll(y, mu, logvar)
