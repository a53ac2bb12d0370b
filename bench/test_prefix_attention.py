"""Prefix attention against what people use today: forward, backward, forward+backward.

    pytest bench/test_prefix_attention.py --benchmark-only

GPU (bf16, head_dim 128, causal, K = 20, N = 2 paths alternating over sequences): 16k tokens as sequences
of 512, 1k, 2k, 4k, with Qwen2-VL-2B heads (12 query / 2 KV) and LLaVA-Mistral heads (32 / 8). Providers:
ours packed (varlen) and padded; (a) torch.cat of the prefix into K/V + SDPA with an explicit mask, one call
for all paths; (b) FlexAttention with a prefix + causal + document block mask (compiled; mask creation
timed separately, in extra_info); (c) flash-attn's varlen function on concatenated K/V, when installed;
(d) ours at K = 0 against SDPA's flash backend with is_causal. TFLOP/s count the prefix:
forward 4·D·(L·K + L(L+1)/2) per sequence and head, backward 2.5× that.
CPU: the same code on 1k tokens in fp32 (our CPU path is the reference), labelled cpu; never GPU figures.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import pdfkernels
from pdfkernels.baselines import cat_sdpa_prefix_attention
from pdfkernels.bench.common import CUDA, DEVICE, QUICK
from pdfkernels.bench.memory import cuda_peak_extra_bytes
from pdfkernels.layout import cu_seqlens_from_lengths

DTYPE = torch.bfloat16 if CUDA else torch.float32
HEAD_DIM, PREFIX, PATHS = 128, 20, 2
TOTAL = 16384 if CUDA else (512 if QUICK else 1024)
SEQ_LENS = [512, 1024, 2048, 4096] if CUDA else ([256] if QUICK else [256, 512])
HEADS = [(12, 2), (32, 8)] if CUDA else [(12, 2)]
MODES = ["fwd", "bwd", "fwd+bwd"]


def _flops(seq_len: int, num_seqs: int, heads: int, prefix: int, mode: str) -> float:
    forward = 4.0 * HEAD_DIM * (seq_len * prefix + seq_len * (seq_len + 1) / 2) * num_seqs * heads
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


class Case:
    """Inputs for one (sequence length, heads, K): padded [S, H, L, D] views of [S, L, H, D] buffers."""

    def __init__(self, seq_len: int, heads: int, kv_heads: int, prefix: int):
        self.seq_len, self.heads, self.kv_heads, self.prefix = seq_len, heads, kv_heads, prefix
        self.num_seqs = TOTAL // seq_len

        def make(h):
            return torch.randn(self.num_seqs, seq_len, h, HEAD_DIM, device=DEVICE, dtype=DTYPE).transpose(1, 2)

        self.q, self.k, self.v = make(heads), make(kv_heads), make(kv_heads)
        self.pk, self.pv = (torch.randn(PATHS, kv_heads, prefix, HEAD_DIM, device=DEVICE, dtype=DTYPE)
                            for _ in range(2))
        self.paths = torch.arange(self.num_seqs, device=DEVICE) % PATHS
        self.cu = cu_seqlens_from_lengths([seq_len] * self.num_seqs, device=DEVICE)

    def leaves(self):
        return [t.detach().requires_grad_() for t in (self.q, self.k, self.v, self.pk, self.pv)]


def _ours_padded(c: Case, q, k, v, pk, pv):
    return pdfkernels.prefix_attention(q, k, v, pk, pv, c.paths)


def _ours_varlen(c: Case, q, k, v, pk, pv):
    # [S, H, L, D] views of [S, L, H, D] buffers -> [T, H, D] packed views: no copy
    def pack(t):
        return t.transpose(1, 2).reshape(-1, t.shape[1], HEAD_DIM)

    out = pdfkernels.prefix_attention_varlen(pack(q), pack(k), pack(v), pk, pv, c.cu, c.seq_len, c.paths)
    return out.view(c.num_seqs, c.seq_len, c.heads, HEAD_DIM)


def _cat_sdpa(c: Case, q, k, v, pk, pv):
    return cat_sdpa_prefix_attention(q, k, v, pk, pv, c.paths)


def _sdpa_flash_no_prefix(c: Case, q, k, v, pk, pv):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


_FLEX_CACHE: dict = {}


def _flex(c: Case, q, k, v, pk, pv):

    fn, mask = _FLEX_CACHE[id(c)]
    keys = torch.cat([pk[c.paths], k], dim=2)
    values = torch.cat([pv[c.paths], v], dim=2)
    return fn(q, keys, values, block_mask=mask, enable_gqa=True)


def _flex_setup(c: Case) -> float:
    """Compile FlexAttention and build its block mask once; returns the mask-creation time in ms."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    prefix = c.prefix

    def prefix_causal(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx - prefix <= q_idx)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    mask = create_block_mask(prefix_causal, c.num_seqs, None, c.seq_len, c.seq_len + prefix, device="cuda")
    end.record()
    torch.cuda.synchronize()
    _FLEX_CACHE[id(c)] = (torch.compile(flex_attention), mask)
    return start.elapsed_time(end)


def _flash_attn_varlen(c: Case, q, k, v, pk, pv):
    from flash_attn import flash_attn_varlen_func

    def pack(t):
        return t.transpose(1, 2).reshape(-1, t.shape[1], HEAD_DIM)

    keys = torch.cat([pk[c.paths], k], dim=2)
    values = torch.cat([pv[c.paths], v], dim=2)
    cu_k = cu_seqlens_from_lengths([c.seq_len + c.prefix] * c.num_seqs, device=DEVICE)
    return flash_attn_varlen_func(pack(q), pack(keys), pack(values), c.cu, cu_k, c.seq_len, c.seq_len + c.prefix,
                                  causal=True)  # bottom-right aligned: prefix visible to all


PROVIDERS = {"pdfkernels-varlen": _ours_varlen, "pdfkernels-padded": _ours_padded, "cat+sdpa": _cat_sdpa}
if CUDA:
    PROVIDERS["flex"] = _flex
    if importlib.util.find_spec("flash_attn") is not None:
        PROVIDERS["flash-attn-varlen"] = _flash_attn_varlen
NO_PREFIX_PROVIDERS = {"pdfkernels-varlen-K0": _ours_varlen, "sdpa-flash-K0": _sdpa_flash_no_prefix}

_CASES: dict = {}


def _case(seq_len, heads, kv_heads, prefix) -> Case:
    key = (seq_len, heads, kv_heads, prefix)
    if key not in _CASES:
        _CASES.clear()  # one case alive at a time
        _CASES[key] = Case(*key)
    return _CASES[key]


def _runner(fn, c: Case, mode: str):
    leaves = c.leaves()
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(c, *leaves)
        return run
    out = fn(c, *leaves)
    upstream = torch.randn_like(out)
    if mode == "bwd":
        def run():
            torch.autograd.grad(out, leaves, upstream, retain_graph=True, allow_unused=True)
        return run

    def run():
        torch.autograd.grad(fn(c, *leaves), leaves, upstream, allow_unused=True)
    return run


def _bench(benchmark, provider, fn, seq_len, heads, kv_heads, prefix, mode):
    c = _case(seq_len, heads, kv_heads, prefix)
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "dtype": str(DTYPE), "seq_len": seq_len,
            "num_seqs": c.num_seqs, "heads": heads, "kv_heads": kv_heads, "K": prefix, "mode": mode}
    if provider == "flex":
        info["flex_block_mask_ms"] = _flex_setup(c)
    run = _runner(fn, c, mode)

    def timed():
        run()
        if CUDA:
            torch.cuda.synchronize()

    for _ in range(3):
        timed()  # warm-up: compiles, autotuning, allocator
    benchmark.pedantic(timed, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    info["tflops_median"] = _flops(seq_len, c.num_seqs, heads, prefix, mode) / median / 1e12
    if CUDA:
        info["peak_extra_bytes"] = cuda_peak_extra_bytes(timed)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads,kv_heads", HEADS, ids=[f"H{h}-{kv}" for h, kv in HEADS])
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=[f"L{n}" for n in SEQ_LENS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_prefix_attention(benchmark, provider, seq_len, heads, kv_heads, mode):
    _bench(benchmark, provider, PROVIDERS[provider], seq_len, heads, kv_heads, PREFIX, mode)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=[f"L{n}" for n in SEQ_LENS])
@pytest.mark.parametrize("provider", list(NO_PREFIX_PROVIDERS))
def test_no_prefix_sanity_line(benchmark, provider, seq_len, mode):
    heads, kv_heads = HEADS[0]
    _bench(benchmark, provider, NO_PREFIX_PROVIDERS[provider], seq_len, heads, kv_heads, 0, mode)
