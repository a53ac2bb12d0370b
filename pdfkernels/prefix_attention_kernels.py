"""Triton kernels of prefix attention: forward, and the FlashAttention-2 backward (dK/dV, dQ, dprefix).

Layout shared by all. A sequence is a batch row (padded layout: batch strides, an optional key padding
mask read in place) or a ``cu_seqlens`` span (packed layout: batch strides 0). Each query sees the K
prefix keys of its sequence's path, read in place from ``[N, Hkv, K, D]``, and its own visible keys, in
one online softmax. Every tensor comes with its own (sequence, token, head) strides; head_dim is unit-stride.

The forward and dQ programs own a block of *packed query rows*: row ``f`` stands for token ``f // G`` and
query head ``kv_head * G + f % G`` (G query heads per KV head), so the query heads of a GQA group share
every K/V tile the program loads (in Hugging Face's ``[B, L, H, D]`` buffers those rows are contiguous).
The dK/dV and dprefix programs walk query heads in an outer loop and tokens in the inner one, so no
row -> (token, head) arithmetic is left in an inner loop.

Speed structure (sm_90, see ``python -m pdfkernels.aot --profile``): every key loop is split into tiles that
are fully visible to every row of the program (no mask arithmetic, unmasked loads) and the few edge tiles
(causal diagonal, end of the sequence, a partial prefix tile). Scores stay in the exp2 domain: the
log-sum-exp is saved as ``log2``, so one FFMA (``s * scale * log2(e) - m``) precedes each EX2. dK/dV use
the keys as the MMA's M operand (``S^T = K Q^T``), so every dot has M >= 64 rows per warpgroup.

Loaded 16-bit tiles are upcast to fp32 under the interpreter (UPCAST: its dot on bf16 is wrong); on GPUs
the dots take 16-bit operands and accumulate in fp32. fp32 inputs use full-precision ("ieee") dots.
``# loop: NAME`` marks the loops that the profile reports and budgets by name.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the kernels use EX2


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
def _load_tile(ptrs, rows_ok, dims, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr,
               UPCAST: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile, zero outside. Fully visible tiles pass MASK_ROWS=False: no predicate at
    all when head_dim is a power of two."""
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(dims < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _tma_tile(desc, seq, head, row, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """A ``[BLOCK, BLOCK_D]`` tile at token ``row`` of a ``[sequences, heads, tokens, head_dim]`` tensor
    descriptor (sm_90 TMA, padded layout only): rows past the sequence's end and columns past head_dim
    arrive as zeros, as masked pointer loads give them. (Packed sequences take pointer loads: there the
    rows after a sequence's end are the next sequence's, and zeroing them in registers spills.)"""
    tile = desc.load([seq, head, row, 0]).reshape(BLOCK, BLOCK_D)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _tile_pair(a_desc, b_desc, a_ptrs, b_ptrs, seq, head, row, ok, dims, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, ROWS: tl.constexpr, MASK_ROWS: tl.constexpr, TMA: tl.constexpr,
               UPCAST: tl.constexpr):
    """Two tiles streamed side by side (K and V, or q and dO), ``ROWS`` rows from token ``row``: through the
    tensor descriptors with TMA (rows past the sequence and columns past head_dim arrive as zeros), else
    through ``a_ptrs``/``b_ptrs`` (rows outside ``ok`` zero with MASK_ROWS). The unused side's address
    arithmetic is dead code the compiler drops."""
    if TMA:
        a = _tma_tile(a_desc, seq, head, row, ROWS, BLOCK_D, UPCAST)
        b = _tma_tile(b_desc, seq, head, row, ROWS, BLOCK_D, UPCAST)
    else:
        a = _load_tile(a_ptrs, ok, dims, HEAD_DIM, BLOCK_D, MASK_ROWS, UPCAST)
        b = _load_tile(b_ptrs, ok, dims, HEAD_DIM, BLOCK_D, MASK_ROWS, UPCAST)
    return a, b


@triton.jit
def _prefix_of(path_ptr, pk_ptr, pv_ptr, seq, kv_head, stride_pn, stride_ph):
    """Sequence ``seq``'s path id (int32: a descriptor coordinate) and the 64-bit bases of that path's prefix
    keys and values for ``kv_head``."""
    path = tl.load(path_ptr + seq).to(tl.int32)
    base = path.to(tl.int64) * stride_pn + kv_head * stride_ph
    return path, pk_ptr + base, pv_ptr + base


@triton.jit
def _row_stats(lse_ptrs, delta_ptrs, ok, MASK_ROWS: tl.constexpr):
    """log2-sum-exp2 and delta of query rows; a row outside is (+inf, 0), so its probabilities are 0."""
    if MASK_ROWS:
        return tl.load(lse_ptrs, mask=ok, other=float("inf")), tl.load(delta_ptrs, mask=ok, other=0.0)
    else:
        return tl.load(lse_ptrs), tl.load(delta_ptrs)


@triton.jit
def _key_mask(mask_ptr, seq, stride_mb, cols, col_ok):
    """The key padding mask of own keys ``cols`` (True = real token)."""
    return tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + cols, mask=col_ok, other=0) != 0


@triton.jit
def _visible(cols, tok, seqlen, seq, mask_ptr, stride_mb, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """``[rows, cols]`` visibility of own keys ``cols`` to queries at tokens ``tok`` (edge tiles only). Causal:
    ``cols <= tok`` also keeps a real row inside its sequence (rows past the end are never stored)."""
    col_ok = cols < seqlen
    if CAUSAL:
        visible = cols[None, :] <= tok[:, None]
    else:
        visible = col_ok[None, :] & (tok >= 0)[:, None]
    if HAS_MASK:
        visible = visible & _key_mask(mask_ptr, seq, stride_mb, cols, col_ok)[None, :]
    return visible


@triton.jit
def _attend(s, vt, m_i, l_i, acc, qk_scale, visible, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Fold scores ``s = q k^T`` of one K/V tile into the online softmax; ``m_i`` is the running max of
    ``s * qk_scale`` (log2 domain). Callers build ``visible`` after the dot: a [rows, cols] mask held across
    the MMA costs registers."""
    if MASKED:
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
        p = tl.exp2(s - m_use[:, None])
    else:
        # every key visible: the new max is finite and scale + shift is one FFMA per score
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_use = m_new
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _own_key_range(row_block, seqlen, G, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For a block of packed query rows: (end of the own-key tiles every row sees whole, end of all keys any
    row sees). Tiles in between are edge tiles (causal diagonal, end of the sequence)."""
    if CAUSAL:
        first_tok = row_block * BLOCK_M // G
        last_tok = (row_block * BLOCK_M + BLOCK_M - 1) // G
        full_end = tl.minimum(first_tok + 1, seqlen) // BLOCK_N * BLOCK_N
        hi = tl.minimum(seqlen, last_tok + 1)
    else:
        full_end = seqlen // BLOCK_N * BLOCK_N
        hi = seqlen
    return full_end, hi


@triton.jit
def prefix_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, path_ptr, cu_ptr, mask_ptr, out_ptr, lse_ptr,
        k_desc, v_desc, pk_desc, pv_desc,
        L, G, K, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_pn, stride_ph, stride_pk, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_mb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Output and log2-sum-exp2 of one block of packed query rows. TMA: the key/value tiles come through the
    ``*_desc`` tensor descriptors (sm_90), else through pointers (the ``*_desc`` arguments are then unused)."""
    row_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok0, seqlen = _span(cu_ptr, seq, L, VARLEN)
    tl.static_assert(not (TMA and VARLEN), "tensor descriptors describe the padded layout only")
    if row_block * BLOCK_M < seqlen * G:
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen * G
        tok = rows // G
        head = kv_head * G + rows % G
        dims = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        q = _load_tile(q_ptr + seq.to(tl.int64) * stride_qb + (tok0 + tok).to(tl.int64)[:, None] * stride_qt
                       + head[:, None] * stride_qh + dims[None, :], row_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
        qk_scale = sm_scale * LOG2E
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # 1) the path's prefix keys, visible to every query: whole tiles, then a partial one
        path, pk_seq, pv_seq = _prefix_of(path_ptr, pk_ptr, pv_ptr, seq, kv_head, stride_pn, stride_ph)
        p_tile = offs_n[:, None] * stride_pk + dims[None, :]  # 32-bit offsets from 64-bit scalar bases
        if PRECISION == "ieee":
            # fp32 (CUDA-core dots): one masked loop. A loop of whole tiles lets the compiler hoist q's FMA
            # operand (a full row of head_dim per thread) into registers, which spills
            for n0 in range(0, K, BLOCK_N):
                col_ok = n0 + offs_n < K
                kt = _load_tile((pk_seq + n0 * stride_pk) + p_tile, col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
                vt = _load_tile((pv_seq + n0 * stride_pk) + p_tile, col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
                s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
                m_i, l_i, acc = _attend(s, vt, m_i, l_i, acc, qk_scale, col_ok[None, :], True, PRECISION)
        else:
            # the partial tile first (the online softmax takes tiles in any order), then whole tiles
            k_full = K // BLOCK_N * BLOCK_N
            if k_full < K:
                col_ok = k_full + offs_n < K
                kt, vt = _tile_pair(pk_desc, pv_desc, (pk_seq + k_full * stride_pk) + p_tile,
                                    (pv_seq + k_full * stride_pk) + p_tile, path, kv_head, k_full, col_ok, dims,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, True, TMA, UPCAST)
                s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
                m_i, l_i, acc = _attend(s, vt, m_i, l_i, acc, qk_scale, col_ok[None, :], True, PRECISION)
            for n0 in range(0, k_full, BLOCK_N):  # loop: fwd-prefix
                kt, vt = _tile_pair(pk_desc, pv_desc, (pk_seq + n0 * stride_pk) + p_tile,
                                    (pv_seq + n0 * stride_pk) + p_tile, path, kv_head, n0, None, dims, HEAD_DIM,
                                    BLOCK_D, BLOCK_N, False, TMA, UPCAST)
                s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
                m_i, l_i, acc = _attend(s, vt, m_i, l_i, acc, qk_scale, None, False, PRECISION)

        # 2) the sequence's own keys: tiles every row sees whole, then the causal diagonal / sequence end
        full_end, hi = _own_key_range(row_block, seqlen, G, BLOCK_M, BLOCK_N, CAUSAL)
        # 64-bit scalar bases + 32-bit tile offsets: half the registers of hoisted pointer tiles
        k_seq = k_ptr + (seq.to(tl.int64) * stride_kb + tok0.to(tl.int64) * stride_kt + kv_head * stride_kh)
        v_seq = v_ptr + (seq.to(tl.int64) * stride_vb + tok0.to(tl.int64) * stride_vt + kv_head * stride_vh)
        k_tile = offs_n[:, None] * stride_kt + dims[None, :]
        v_tile = offs_n[:, None] * stride_vt + dims[None, :]
        for n0 in range(0, full_end, BLOCK_N):  # loop: fwd-own
            kt, vt = _tile_pair(k_desc, v_desc, (k_seq + n0 * stride_kt) + k_tile, (v_seq + n0 * stride_vt) + v_tile,
                                seq, kv_head, n0, None, dims, HEAD_DIM, BLOCK_D, BLOCK_N, False, TMA, UPCAST)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
            if HAS_MASK:  # padding can sit anywhere in a padded row: masked like an edge tile
                real = _key_mask(mask_ptr, seq, stride_mb, n0 + offs_n, offs_n >= 0)
                m_i, l_i, acc = _attend(s, vt, m_i, l_i, acc, qk_scale, real[None, :], True, PRECISION)
            else:
                m_i, l_i, acc = _attend(s, vt, m_i, l_i, acc, qk_scale, None, False, PRECISION)
        for n0 in range(full_end, hi, BLOCK_N):  # loop: fwd-own-edge
            cols = n0 + offs_n
            col_ok = cols < seqlen
            kt, vt = _tile_pair(k_desc, v_desc, (k_seq + n0 * stride_kt) + k_tile, (v_seq + n0 * stride_vt) + v_tile,
                                seq, kv_head, n0, col_ok, dims, HEAD_DIM, BLOCK_D, BLOCK_N, True, TMA, UPCAST)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
            visible = _visible(cols, tok, seqlen, seq, mask_ptr, stride_mb, CAUSAL, HAS_MASK)
            m_i, l_i, acc = _attend(s, vt, m_i, l_i, acc, qk_scale, visible, True, PRECISION)

        # a query with no visible key: output 0 and lse = +inf, so the backward's exp2(s - lse) is 0
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        # the store offsets, recomputed from the row sums (never < 0, NaN included: + 0) so that the compiler
        # does not keep the prologue's per-row heads alive (spilled) across the loops
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M) + (l_i < 0.0).to(tl.int32)
        row_ok = rows < seqlen * G
        tok = rows // G
        head = kv_head * G + rows % G
        o_off = seq.to(tl.int64) * stride_ob + (tok0 + tok).to(tl.int64)[:, None] * stride_ot \
            + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])
        l_off = seq.to(tl.int64) * stride_lb + (tok0 + tok).to(tl.int64) * stride_lt + head
        tl.store(lse_ptr + l_off, lse, mask=row_ok)


@triton.jit
def _dkdv_step(kt, vt, q, do, lse, delta, dk, dv, qk_scale, cols, toks, CAUSAL_TILE: tl.constexpr,
               PRECISION: tl.constexpr):
    """One tile of queries into dK, dV of the program's keys, keys as the M operand (``S^T = K Q^T``);
    CAUSAL_TILE: a diagonal tile, key ``cols`` visible to query ``toks`` when ``cols <= toks``."""
    st = tl.dot(kt, tl.trans(q), input_precision=PRECISION)
    pt = tl.exp2(st * qk_scale - lse[None, :])
    if CAUSAL_TILE:
        pt = tl.where(cols[:, None] <= toks[None, :], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def prefix_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, mask_ptr, dk_ptr, dv_ptr, q_desc, do_desc,
        L, G, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
        stride_lb, stride_lt, stride_mb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dK, dV of BLOCK_N own keys: for each query head of the group, a loop over the tokens that see them
    (BLOCK_M at a time): the causal diagonal masked, the rest without mask arithmetic (rows past the end
    load lse = +inf, so their probabilities are 0). TMA: q and dO tiles through ``q_desc``/``do_desc``."""
    key_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok0, seqlen = _span(cu_ptr, seq, L, VARLEN)
    tl.static_assert(not (TMA and VARLEN), "tensor descriptors describe the padded layout only")
    n0 = key_block * BLOCK_N
    if n0 < seqlen:
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        dims = tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        # 64-bit scalar bases and 32-bit in-sequence offsets throughout: fewer registers held across loops
        seq64 = seq.to(tl.int64)
        tok64 = tok0.to(tl.int64)
        kt = _load_tile(k_ptr + (seq64 * stride_kb + tok64 * stride_kt + kv_head * stride_kh)
                        + (cols[:, None] * stride_kt + dims[None, :]), col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
        vt = _load_tile(v_ptr + (seq64 * stride_vb + tok64 * stride_vt + kv_head * stride_vh)
                        + (cols[:, None] * stride_vt + dims[None, :]), col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        qk_scale = sm_scale * LOG2E
        if CAUSAL:  # queries before the key block see none of it; the next BLOCK_N tokens see part of it
            start = n0
            diag_end = tl.minimum(n0 + BLOCK_N, seqlen)
        else:
            start = 0
            diag_end = 0
        q_tile = offs_m[:, None] * stride_qt + dims[None, :]
        o_tile = offs_m[:, None] * stride_ot + dims[None, :]
        for h in range(0, G):
            head = kv_head * G + h
            q_seq = q_ptr + (seq64 * stride_qb + tok64 * stride_qt + head * stride_qh)
            do_seq = do_ptr + (seq64 * stride_ob + tok64 * stride_ot + head * stride_oh)
            l_seq = seq64 * stride_lb + tok64 * stride_lt + head
            for m0 in range(start, diag_end, BLOCK_M):  # loop: dkdv-diagonal
                toks = m0 + offs_m
                ok = toks < seqlen
                q, do = _tile_pair(q_desc, do_desc, (q_seq + m0 * stride_qt) + q_tile,
                                   (do_seq + m0 * stride_ot) + o_tile, seq, head, m0, ok, dims, HEAD_DIM, BLOCK_D,
                                   BLOCK_M, True, TMA, UPCAST)
                l_off = l_seq + toks * stride_lt
                lse, delta = _row_stats(lse_ptr + l_off, delta_ptr + l_off, ok, True)
                dk, dv = _dkdv_step(kt, vt, q, do, lse, delta, dk, dv, qk_scale, cols, toks, True, PRECISION)
            # the rest: no mask arithmetic; loads are masked (a few predicates per tile; TMA: zeros past the
            # end) so that the sequence's last partial tile needs no code of its own (registers)
            for m0 in range(diag_end, seqlen, BLOCK_M):  # loop: dkdv
                toks = m0 + offs_m
                ok = toks < seqlen
                q, do = _tile_pair(q_desc, do_desc, (q_seq + m0 * stride_qt) + q_tile,
                                   (do_seq + m0 * stride_ot) + o_tile, seq, head, m0, ok, dims, HEAD_DIM, BLOCK_D,
                                   BLOCK_M, True, TMA, UPCAST)
                l_off = l_seq + toks * stride_lt
                lse, delta = _row_stats(lse_ptr + l_off, delta_ptr + l_off, ok, True)
                dk, dv = _dkdv_step(kt, vt, q, do, lse, delta, dk, dv, qk_scale, None, None, False, PRECISION)
        # the key block's first row as a scalar base, rows counted from it: nothing per row is kept from
        # the prologue across the loops (it was spilled)
        offs_n = tl.arange(0, BLOCK_N)
        if HAS_MASK:  # a padding key is visible to no query: its gradients are 0 (where: never inf * 0)
            real = _key_mask(mask_ptr, seq, stride_mb, n0 + offs_n, offs_n < seqlen - n0)[:, None]
            dk = tl.where(real, dk, 0.0)
            dv = tl.where(real, dv, 0.0)
        store_ok = (offs_n < seqlen - n0)[:, None] & (dims < HEAD_DIM)[None, :]
        dk_ptrs = dk_ptr + (seq64 * stride_dkb + (tok64 + n0) * stride_dkt + kv_head * stride_dkh) \
            + (offs_n[:, None] * stride_dkt + dims[None, :])
        dv_ptrs = dv_ptr + (seq64 * stride_dvb + (tok64 + n0) * stride_dvt + kv_head * stride_dvh) \
            + (offs_n[:, None] * stride_dvt + dims[None, :])
        tl.store(dk_ptrs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=store_ok)
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _dq_step(q, do, kt, vt, lse, delta, dq, qk_scale, visible, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile into dQ of the program's query rows (``visible``: a row or column vector, or a mask
    the compiler can build after the dot)."""
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)


@triton.jit
def prefix_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, path_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, mask_ptr, dq_ptr,
        k_desc, v_desc, pk_desc, pv_desc,
        L, G, K, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_pn, stride_ph, stride_pk, stride_ob, stride_ot, stride_oh, stride_dqb, stride_dqt, stride_dqh,
        stride_lb, stride_lt, stride_mb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dQ of one block of packed query rows over the prefix keys and the own keys (edge tiles masked); TMA as
    in the forward."""
    row_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok0, seqlen = _span(cu_ptr, seq, L, VARLEN)
    tl.static_assert(not (TMA and VARLEN), "tensor descriptors describe the padded layout only")
    if row_block * BLOCK_M < seqlen * G:
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen * G
        tok = rows // G
        head = kv_head * G + rows % G
        dims = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        tok_off = (tok0 + tok).to(tl.int64)[:, None]
        q = _load_tile(q_ptr + seq.to(tl.int64) * stride_qb + tok_off * stride_qt + head[:, None] * stride_qh
                       + dims[None, :], row_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
        do = _load_tile(do_ptr + seq.to(tl.int64) * stride_ob + tok_off * stride_ot + head[:, None] * stride_oh
                        + dims[None, :], row_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
        l_off = seq.to(tl.int64) * stride_lb + (tok0 + tok).to(tl.int64) * stride_lt + head
        lse, delta = _row_stats(lse_ptr + l_off, delta_ptr + l_off, row_ok, True)
        qk_scale = sm_scale * LOG2E
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # prefix keys: whole tiles, then a partial one (fp32: one masked loop, see the forward)
        path, pk_seq, pv_seq = _prefix_of(path_ptr, pk_ptr, pv_ptr, seq, kv_head, stride_pn, stride_ph)
        p_tile = offs_n[:, None] * stride_pk + dims[None, :]
        if PRECISION == "ieee":
            for n0 in range(0, K, BLOCK_N):
                col_ok = n0 + offs_n < K
                kt = _load_tile((pk_seq + n0 * stride_pk) + p_tile, col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
                vt = _load_tile((pv_seq + n0 * stride_pk) + p_tile, col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
                dq = _dq_step(q, do, kt, vt, lse, delta, dq, qk_scale, col_ok[None, :], True, PRECISION)
        else:
            k_full = K // BLOCK_N * BLOCK_N
            for n0 in range(0, k_full, BLOCK_N):  # loop: dq-prefix
                kt, vt = _tile_pair(pk_desc, pv_desc, (pk_seq + n0 * stride_pk) + p_tile,
                                    (pv_seq + n0 * stride_pk) + p_tile, path, kv_head, n0, None, dims, HEAD_DIM,
                                    BLOCK_D, BLOCK_N, False, TMA, UPCAST)
                dq = _dq_step(q, do, kt, vt, lse, delta, dq, qk_scale, None, False, PRECISION)
            if k_full < K:
                col_ok = k_full + offs_n < K
                kt, vt = _tile_pair(pk_desc, pv_desc, (pk_seq + k_full * stride_pk) + p_tile,
                                    (pv_seq + k_full * stride_pk) + p_tile, path, kv_head, k_full, col_ok, dims,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, True, TMA, UPCAST)
                dq = _dq_step(q, do, kt, vt, lse, delta, dq, qk_scale, col_ok[None, :], True, PRECISION)

        # own keys: tiles every row sees whole, then the edge tiles
        full_end, hi = _own_key_range(row_block, seqlen, G, BLOCK_M, BLOCK_N, CAUSAL)
        k_ptrs = k_ptr + (seq.to(tl.int64) * stride_kb + tok0.to(tl.int64) * stride_kt + kv_head * stride_kh) \
            + (offs_n[:, None] * stride_kt + dims[None, :])
        v_ptrs = v_ptr + (seq.to(tl.int64) * stride_vb + tok0.to(tl.int64) * stride_vt + kv_head * stride_vh) \
            + (offs_n[:, None] * stride_vt + dims[None, :])
        for n0 in range(0, full_end, BLOCK_N):  # loop: dq
            kt, vt = _tile_pair(k_desc, v_desc, k_ptrs + n0 * stride_kt, v_ptrs + n0 * stride_vt, seq, kv_head, n0,
                                None, dims, HEAD_DIM, BLOCK_D, BLOCK_N, False, TMA, UPCAST)
            if HAS_MASK:
                real = _key_mask(mask_ptr, seq, stride_mb, n0 + offs_n, offs_n >= 0)
                dq = _dq_step(q, do, kt, vt, lse, delta, dq, qk_scale, real[None, :], True, PRECISION)
            else:
                dq = _dq_step(q, do, kt, vt, lse, delta, dq, qk_scale, None, False, PRECISION)
        for n0 in range(full_end, hi, BLOCK_N):  # loop: dq-edge
            cols = n0 + offs_n
            col_ok = cols < seqlen
            kt, vt = _tile_pair(k_desc, v_desc, k_ptrs + n0 * stride_kt, v_ptrs + n0 * stride_vt, seq, kv_head, n0,
                                col_ok, dims, HEAD_DIM, BLOCK_D, BLOCK_N, True, TMA, UPCAST)
            visible = _visible(cols, tok, seqlen, seq, mask_ptr, stride_mb, CAUSAL, HAS_MASK)
            dq = _dq_step(q, do, kt, vt, lse, delta, dq, qk_scale, visible, True, PRECISION)
        dq_off = seq.to(tl.int64) * stride_dqb + tok_off * stride_dqt + head[:, None] * stride_dqh + dims[None, :]
        tl.store(dq_ptr + dq_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _dprefix_step(q, do, pkt, pvt, lse, delta, dpk_t, dpv_t, qk_scale, PRECISION: tl.constexpr):
    """One tile of query rows into the transposed prefix gradients ``[D, BLOCK_N]``: head_dim is the M
    operand, so a short prefix (K = 20) wastes no MMA rows."""
    s = tl.dot(q, tl.trans(pkt), input_precision=PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(pvt), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dpv_t += tl.dot(tl.trans(do), p.to(do.dtype), input_precision=PRECISION)
    dpk_t += tl.dot(tl.trans(q), ds.to(q.dtype), input_precision=PRECISION)
    return dpk_t, dpv_t


@triton.jit
def prefix_attention_bwd_dprefix_kernel(
        q_ptr, pk_ptr, pv_ptr, path_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, dpk_ptr, dpv_ptr, q_desc, do_desc,
        L, G, K, chunk, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_pn, stride_ph, stride_pk, stride_ob, stride_ot, stride_oh,
        stride_lb, stride_lt,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """One fp32 partial of dprefix_k, dprefix_v ``[BLOCK_N, BLOCK_D]`` per (chunk of ``chunk`` tokens x all
    G heads, sequence, KV head, block of prefix keys), accumulated in registers and written once, to slot
    ``((seq * Hkv + kv_head) * chunks + chunk_id) * K_pad + key``; summed afterwards in a fixed order (no
    atomics: deterministic). Every prefix key is visible to every query, so only loads are masked. TMA: q
    and dO tiles through ``q_desc``/``do_desc``."""
    chunk_id = tl.program_id(0)
    seq = tl.program_id(1)
    key_blocks = tl.cdiv(K, BLOCK_N)
    kv_head = tl.program_id(2) // key_blocks
    n0 = tl.program_id(2) % key_blocks * BLOCK_N
    tok0, seqlen = _span(cu_ptr, seq, L, VARLEN)
    tl.static_assert(not (TMA and VARLEN), "tensor descriptors describe the padded layout only")
    dims = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    p_off = tl.load(path_ptr + seq).to(tl.int64) * stride_pn + kv_head * stride_ph + cols[:, None] * stride_pk \
        + dims[None, :]
    pkt = _load_tile(pk_ptr + p_off, col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
    pvt = _load_tile(pv_ptr + p_off, col_ok, dims, HEAD_DIM, BLOCK_D, True, UPCAST)
    dpk_t = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dpv_t = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    qk_scale = sm_scale * LOG2E
    t_lo = chunk_id * chunk
    t_hi = tl.minimum(t_lo + chunk, seqlen)
    full_end = tl.maximum(t_lo, t_hi - (t_hi - t_lo) % BLOCK_M)
    q_tile = offs_m[:, None] * stride_qt + dims[None, :]
    o_tile = offs_m[:, None] * stride_ot + dims[None, :]
    l_tile = offs_m * stride_lt
    seq64 = seq.to(tl.int64)
    tok64 = tok0.to(tl.int64)
    for h in range(0, G):
        head = kv_head * G + h
        q_seq = q_ptr + (seq64 * stride_qb + tok64 * stride_qt + head * stride_qh)
        do_seq = do_ptr + (seq64 * stride_ob + tok64 * stride_ot + head * stride_oh)
        l_seq = seq64 * stride_lb + tok64 * stride_lt + head
        for m0 in range(t_lo, full_end, BLOCK_M):  # loop: dprefix
            q, do = _tile_pair(q_desc, do_desc, (q_seq + m0 * stride_qt) + q_tile, (do_seq + m0 * stride_ot) + o_tile,
                               seq, head, m0, None, dims, HEAD_DIM, BLOCK_D, BLOCK_M, False, TMA, UPCAST)
            l_off = (l_seq + m0 * stride_lt) + l_tile
            lse, delta = _row_stats(lse_ptr + l_off, delta_ptr + l_off, None, False)
            dpk_t, dpv_t = _dprefix_step(q, do, pkt, pvt, lse, delta, dpk_t, dpv_t, qk_scale, PRECISION)
        if full_end < t_hi:  # the chunk's last partial tile: rows outside load lse = +inf (probabilities 0)
            ok = full_end + offs_m < t_hi
            q, do = _tile_pair(q_desc, do_desc, (q_seq + full_end * stride_qt) + q_tile,
                               (do_seq + full_end * stride_ot) + o_tile, seq, head, full_end, ok, dims, HEAD_DIM,
                               BLOCK_D, BLOCK_M, True, TMA, UPCAST)
            l_off = (l_seq + full_end * stride_lt) + l_tile
            lse, delta = _row_stats(lse_ptr + l_off, delta_ptr + l_off, ok, True)
            dpk_t, dpv_t = _dprefix_step(q, do, pkt, pvt, lse, delta, dpk_t, dpv_t, qk_scale, PRECISION)
    # columns past K hold exp2(-lse) terms of zero keys: never stored. A scalar base and fresh column
    # offsets: nothing per column is kept from the prologue across the loops (it was spilled)
    k_pad = key_blocks * BLOCK_N
    slot = ((seq * tl.num_programs(2) // key_blocks + kv_head) * tl.num_programs(0) + chunk_id).to(tl.int64) * k_pad
    offs_n = tl.arange(0, BLOCK_N)
    part_off = offs_n[None, :] * BLOCK_D + dims[:, None]
    store_ok = (offs_n < K - n0)[None, :]
    tl.store(dpk_ptr + (slot + n0) * BLOCK_D + part_off, dpk_t * sm_scale, mask=store_ok)
    tl.store(dpv_ptr + (slot + n0) * BLOCK_D + part_off, dpv_t, mask=store_ok)
