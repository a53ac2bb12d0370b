"""Triton kernels of prefix attention: forward, and the FlashAttention-2 backward (dK/dV, then dQ + dprefix).

Layout shared by all three. A program owns one block of *packed query rows* of one sequence and one KV
head: row ``f`` stands for token ``t = f // G`` and query head ``kv_head * G + f % G`` (G query heads per
KV head), so the query heads of a GQA group share every K/V tile the program loads, and in Hugging Face's
``[B, L, H, D]`` buffers those rows are contiguous. A sequence is a batch row (padded layout: batch
strides, an optional key padding mask read in place) or a ``cu_seqlens`` span (packed layout: batch
strides 0). Each query sees the K prefix keys of its sequence's path, read in place from
``[N, Hkv, K, D]``, and its own visible keys, in one online softmax (exp2 domain).

Loaded 16-bit tiles are upcast to fp32 under the interpreter (UPCAST: its dot on bf16 is wrong); on GPUs
the dots take 16-bit operands and accumulate in fp32. fp32 inputs use full-precision ("ieee") dots.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _span(cu_ptr, seq, L, VARLEN: tl.constexpr):
    """(first token, length) of sequence ``seq``."""
    start = 0
    length = L
    if VARLEN:
        start = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - start
    return start, length


@triton.jit
def _dim_mask(BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Columns inside head_dim; a constant (folded away) when head_dim is a power of two."""
    dims = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        return dims, tl.full([BLOCK_D], 1, tl.int1)
    else:
        return dims, dims < HEAD_DIM


@triton.jit
def _load_tile(ptr, offsets, rows_ok, dim_ok, UPCAST: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile, zero outside; upcast to fp32 under the interpreter."""
    tile = tl.load(ptr + offsets, mask=rows_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _prefix_tiles(pk_ptr, pv_ptr, p_base, n0, K, stride_pk, dims, dim_ok, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Prefix keys/values ``n0 .. n0 + BLOCK_N`` of one path and KV head: (columns, in range, K tile, V tile)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    kv_off = p_base + cols[:, None] * stride_pk + dims[None, :]
    return cols, col_ok, _load_tile(pk_ptr, kv_off, col_ok, dim_ok, UPCAST), _load_tile(pv_ptr, kv_off, col_ok,
                                                                                        dim_ok, UPCAST)


@triton.jit
def _softmax_step(q, kt, vt, visible, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """Fold one K/V tile into the online softmax (exp2 domain; rows with nothing visible yet stay at 0)."""
    s = tl.where(visible, tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _recompute_p(q, kt, lse, visible, sm_scale, PRECISION: tl.constexpr):
    """The forward's probabilities from the saved log-sum-exp: ``exp(q k^T scale - lse)``."""
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * sm_scale
    return tl.where(visible, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _ds(p, do, vt, delta, PRECISION: tl.constexpr):
    """Gradient of the scores: ``p * (dO v^T - delta)`` with ``delta = rowsum(dO * O)``."""
    return p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])


@triton.jit
def _visible(cols, tok, seqlen, seq, mask_ptr, stride_mb, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """``[rows, cols]`` visibility of own keys ``cols`` to queries at tokens ``tok``."""
    col_ok = cols < seqlen
    visible = col_ok[None, :] & (tok >= 0)[:, None]
    if HAS_MASK:
        real = tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + cols, mask=col_ok, other=0)
        visible = visible & (real != 0)[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= tok[:, None])
    return visible


@triton.jit
def prefix_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, path_ptr, cu_ptr, mask_ptr, out_ptr, lse_ptr,
        L, G, K, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_pn, stride_ph, stride_pk, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_mb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr):
    row_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok0, seqlen = _span(cu_ptr, seq, L, VARLEN)
    if row_block * BLOCK_M < seqlen * G:
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen * G
        tok = rows // G
        head = kv_head * G + rows % G
        dims, dim_ok = _dim_mask(BLOCK_D, HEAD_DIM)
        q_off = seq.to(tl.int64) * stride_qb + (tok0 + tok).to(tl.int64)[:, None] * stride_qt \
            + head[:, None] * stride_qh + dims[None, :]
        q = _load_tile(q_ptr, q_off, row_ok, dim_ok, UPCAST)
        qk_scale = sm_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # 1) the path's prefix keys, visible to every query
        p_base = tl.load(path_ptr + seq).to(tl.int64) * stride_pn + kv_head * stride_ph
        for n0 in range(0, K, BLOCK_N):
            _, col_ok, kt, vt = _prefix_tiles(pk_ptr, pv_ptr, p_base, n0, K, stride_pk, dims, dim_ok, BLOCK_N, UPCAST)
            m_i, l_i, acc = _softmax_step(q, kt, vt, col_ok[None, :], m_i, l_i, acc, qk_scale, PRECISION)

        # 2) the sequence's own keys, under the causal and padding masks
        hi = seqlen
        if CAUSAL:
            hi = tl.minimum(seqlen, (row_block * BLOCK_M + BLOCK_M - 1) // G + 1)
        k_base = seq.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = seq.to(tl.int64) * stride_vb + kv_head * stride_vh
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < seqlen
            col_off = (tok0 + cols).to(tl.int64)[:, None]
            kt = _load_tile(k_ptr, k_base + col_off * stride_kt + dims[None, :], col_ok, dim_ok, UPCAST)
            vt = _load_tile(v_ptr, v_base + col_off * stride_vt + dims[None, :], col_ok, dim_ok, UPCAST)
            visible = _visible(cols, tok, seqlen, seq, mask_ptr, stride_mb, CAUSAL, HAS_MASK)
            m_i, l_i, acc = _softmax_step(q, kt, vt, visible, m_i, l_i, acc, qk_scale, PRECISION)

        # a query with no visible key: output 0 and lse = +inf, so the backward's exp(s - lse) is 0
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        o_off = seq.to(tl.int64) * stride_ob + (tok0 + tok).to(tl.int64)[:, None] * stride_ot \
            + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        l_off = seq.to(tl.int64) * stride_lb + (tok0 + tok).to(tl.int64) * stride_lt + head
        tl.store(lse_ptr + l_off, lse, mask=row_ok)


@triton.jit
def prefix_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, mask_ptr, dk_ptr, dv_ptr,
        L, G, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
        stride_lb, stride_lt, stride_mb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr):
    """dK, dV of one block of own keys: a loop over every query row (all G heads) that can see it."""
    key_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok0, seqlen = _span(cu_ptr, seq, L, VARLEN)
    if key_block * BLOCK_N < seqlen:
        cols = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        dims, dim_ok = _dim_mask(BLOCK_D, HEAD_DIM)
        col_off = (tok0 + cols).to(tl.int64)[:, None]
        kt = _load_tile(k_ptr, seq.to(tl.int64) * stride_kb + col_off * stride_kt + kv_head * stride_kh + dims[None, :],
                        col_ok, dim_ok, UPCAST)
        vt = _load_tile(v_ptr, seq.to(tl.int64) * stride_vb + col_off * stride_vt + kv_head * stride_vh + dims[None, :],
                        col_ok, dim_ok, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = 0
        if CAUSAL:
            lo = (key_block * BLOCK_N * G) // BLOCK_M * BLOCK_M
        for m0 in range(lo, seqlen * G, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < seqlen * G
            tok = rows // G
            head = kv_head * G + rows % G
            tok_off = (tok0 + tok).to(tl.int64)
            q_off = seq.to(tl.int64) * stride_qb + tok_off[:, None] * stride_qt + head[:, None] * stride_qh \
                + dims[None, :]
            o_off = seq.to(tl.int64) * stride_ob + tok_off[:, None] * stride_ot + head[:, None] * stride_oh \
                + dims[None, :]
            q = _load_tile(q_ptr, q_off, row_ok, dim_ok, UPCAST)
            do = _load_tile(do_ptr, o_off, row_ok, dim_ok, UPCAST)
            l_off = seq.to(tl.int64) * stride_lb + tok_off * stride_lt + head
            lse = tl.load(lse_ptr + l_off, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + l_off, mask=row_ok, other=0.0)
            visible = _visible(cols, tl.where(row_ok, tok, -1), seqlen, seq, mask_ptr, stride_mb, CAUSAL, HAS_MASK)
            p = _recompute_p(q, kt, lse, visible, sm_scale, PRECISION)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            ds = _ds(p, do, vt, delta, PRECISION)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        store_ok = col_ok[:, None] & dim_ok[None, :]
        dk_off = seq.to(tl.int64) * stride_dkb + col_off * stride_dkt + kv_head * stride_dkh + dims[None, :]
        dv_off = seq.to(tl.int64) * stride_dvb + col_off * stride_dvt + kv_head * stride_dvh + dims[None, :]
        tl.store(dk_ptr + dk_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=store_ok)
        tl.store(dv_ptr + dv_off, dv.to(dv_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def prefix_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, path_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, mask_ptr,
        dq_ptr, dpk_ptr, dpv_ptr,
        L, G, K, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_pn, stride_ph, stride_pk, stride_ob, stride_ot, stride_oh, stride_dqb, stride_dqt, stride_dqh,
        stride_lb, stride_lt, stride_mb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr):
    """dQ of one block of query rows, and this block's partial dprefix_k, dprefix_v ``[K, D]`` (fp32,
    one slot per program in ``dpk``/``dpv``: summed afterwards in a fixed order, so no atomics)."""
    row_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    slot = ((seq * tl.num_programs(2) + kv_head) * tl.num_programs(0) + row_block).to(tl.int64) * K
    tok0, seqlen = _span(cu_ptr, seq, L, VARLEN)
    dims, dim_ok = _dim_mask(BLOCK_D, HEAD_DIM)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen * G
    tok = rows // G
    head = kv_head * G + rows % G
    tok_off = (tok0 + tok).to(tl.int64)
    q_off = seq.to(tl.int64) * stride_qb + tok_off[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    o_off = seq.to(tl.int64) * stride_ob + tok_off[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    q = _load_tile(q_ptr, q_off, row_ok, dim_ok, UPCAST)
    do = _load_tile(do_ptr, o_off, row_ok, dim_ok, UPCAST)
    l_off = seq.to(tl.int64) * stride_lb + tok_off * stride_lt + head
    lse = tl.load(lse_ptr + l_off, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + l_off, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # prefix keys: dQ, and this block's share of dprefix (zero when the block has no rows)
    p_base = tl.load(path_ptr + seq).to(tl.int64) * stride_pn + kv_head * stride_ph
    for n0 in range(0, K, BLOCK_N):
        cols, col_ok, kt, vt = _prefix_tiles(pk_ptr, pv_ptr, p_base, n0, K, stride_pk, dims, dim_ok, BLOCK_N, UPCAST)
        p = _recompute_p(q, kt, lse, col_ok[None, :] & row_ok[:, None], sm_scale, PRECISION)
        ds = _ds(p, do, vt, delta, PRECISION)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
        part_off = slot * BLOCK_D + cols[:, None] * BLOCK_D + dims[None, :]
        store_ok = col_ok[:, None] & (dims < BLOCK_D)[None, :]
        tl.store(dpk_ptr + part_off, tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * sm_scale,
                 mask=store_ok)
        tl.store(dpv_ptr + part_off, tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION), mask=store_ok)

    # own keys (none for a block past the end of a short sequence)
    hi = seqlen
    if CAUSAL:
        hi = tl.minimum(seqlen, (row_block * BLOCK_M + BLOCK_M - 1) // G + 1)
    hi = tl.where(row_block * BLOCK_M < seqlen * G, hi, 0)
    k_base = seq.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = seq.to(tl.int64) * stride_vb + kv_head * stride_vh
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        col_off = (tok0 + cols).to(tl.int64)[:, None]
        kt = _load_tile(k_ptr, k_base + col_off * stride_kt + dims[None, :], col_ok, dim_ok, UPCAST)
        vt = _load_tile(v_ptr, v_base + col_off * stride_vt + dims[None, :], col_ok, dim_ok, UPCAST)
        visible = _visible(cols, tl.where(row_ok, tok, -1), seqlen, seq, mask_ptr, stride_mb, CAUSAL, HAS_MASK)
        ds = _ds(_recompute_p(q, kt, lse, visible, sm_scale, PRECISION), do, vt, delta, PRECISION)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    dq_off = seq.to(tl.int64) * stride_dqb + tok_off[:, None] * stride_dqt + head[:, None] * stride_dqh \
        + dims[None, :]
    tl.store(dq_ptr + dq_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
