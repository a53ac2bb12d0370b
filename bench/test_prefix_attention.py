"""Prefix attention against the fastest ways a user could write it today: forward, backward, forward+backward.

    pytest bench/test_prefix_attention.py --benchmark-only

GPU (bf16, head_dim 128, causal, K = 20, N = 2 paths alternating over sequences): 16k tokens as sequences
of 512, 1k, 2k, 4k, with Qwen2-VL-2B heads (12 query / 2 KV) and LLaVA-Mistral heads (32 / 8). Providers:
ours packed (varlen) and padded; ``torch.cat`` of the prefix into K/V and SDPA (a) with an explicit boolean mask
(the Hugging Face / PEFT way; SDPA's masked paths), (b) with ``causal_lower_right(L, K + L)`` and no mask tensor
(SDPA picks flash or memory-efficient), (c) the same forced onto cuDNN (``sdpa_kernel``), and with the pattern as
one shared ``[L, K + L]`` mask under cuDNN (each skipped with the reason where cuDNN refuses the call or another
backend ran); (d) FlexAttention with a prefix + causal block mask
(compiled; mask creation timed separately, in extra); (e) flash-attn's varlen call on prefixed K/V, when installed;
and ours at K = 0 against SDPA with is_causal. Each row names the SDPA backend that ran (profiler) and the
provider's library version. TFLOP/s count the prefix: forward 4·D·(L·K + L(L+1)/2) per sequence and head,
backward 2.5× that. CPU: the same code on 1k tokens in fp32 (our CPU path is PyTorch), labelled cpu.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import pdfkernels
from pdfkernels.baselines import (
    cat_sdpa_prefix_attention,
    flash_attn_varlen_prefix_attention,
    sdpa_backends_run,
    sdpa_prefix_attention,
)
from pdfkernels.bench.common import CUDA, DEVICE, QUICK, device_name, library_version
from pdfkernels.bench.memory import cuda_peak_extra_bytes
from pdfkernels.bench.schema import timed_info
from pdfkernels.packing import cu_seqlens_from_lengths

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


def _sdpa_lower_right(c: Case, q, k, v, pk, pv):
    return sdpa_prefix_attention(q, k, v, pk, pv, c.paths)


def _sdpa_cudnn(c: Case, q, k, v, pk, pv):
    return sdpa_prefix_attention(q, k, v, pk, pv, c.paths, backend=SDPBackend.CUDNN_ATTENTION)


def _sdpa_cudnn_mask(c: Case, q, k, v, pk, pv):
    return sdpa_prefix_attention(q, k, v, pk, pv, c.paths, backend=SDPBackend.CUDNN_ATTENTION, shared_mask=True)


def _sdpa_causal_no_prefix(c: Case, q, k, v, pk, pv):
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
    def pack(t):
        return t.transpose(1, 2).reshape(-1, t.shape[1], HEAD_DIM)

    out = flash_attn_varlen_prefix_attention(pack(q), pack(k), pack(v), pk, pv, c.cu, c.seq_len, c.paths)
    return out.view(c.num_seqs, c.seq_len, c.heads, HEAD_DIM)


# provider -> (function, library whose version the row names, why it cannot run here or None)
_NO_FLASH_ATTN = None if importlib.util.find_spec("flash_attn") else "flash-attn is not installed"
PROVIDERS = {
    "pdfkernels-varlen": (_ours_varlen, "pdfkernels", None),
    "pdfkernels-padded": (_ours_padded, "pdfkernels", None),
    "sdpa-mask": (_cat_sdpa, "torch", None),
    "sdpa-lower-right": (_sdpa_lower_right, "torch", None),
    "sdpa-cudnn": (_sdpa_cudnn, "cudnn", None if CUDA else "cuDNN runs on CUDA only"),
    "sdpa-cudnn-mask": (_sdpa_cudnn_mask, "cudnn", None if CUDA else "cuDNN runs on CUDA only"),
    "flex": (_flex, "torch", None if CUDA else "FlexAttention is timed on CUDA only (CPU: inductor C++ compile)"),
    "flash-attn-varlen": (_flash_attn_varlen, "flash_attn", _NO_FLASH_ATTN or (None if CUDA else "needs CUDA")),
}
NO_PREFIX_PROVIDERS = {"pdfkernels-varlen-K0": (_ours_varlen, "pdfkernels", None),
                       "sdpa-causal-K0": (_sdpa_causal_no_prefix, "torch", None)}
OWN_BACKENDS = {"flex": "flex (compiled)", "flash-attn-varlen": "flash-attn"}

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


def _backend(provider: str, fn, c: Case) -> str:
    """The attention backend the provider's forward ran; the sdpa-cudnn rows are skipped unless it is cuDNN."""
    if provider in OWN_BACKENDS:
        return OWN_BACKENDS[provider]
    try:
        with torch.no_grad():
            ran = sdpa_backends_run(lambda: fn(c, c.q, c.k, c.v, c.pk, c.pv))
    except RuntimeError as exc:
        if provider.startswith("sdpa-cudnn"):
            pytest.skip(f"{provider}: cuDNN refuses this call ({str(exc).splitlines()[0][:120]})")
        raise
    if provider.startswith("sdpa-cudnn") and ran != ("cudnn",):
        pytest.skip(f"{provider}: forced cuDNN, but {ran} ran")
    return "+".join(ran) or ("triton" if CUDA else "pytorch (no SDPA kernel)")


def _bench(benchmark, provider, spec, seq_len, heads, kv_heads, prefix, mode):
    fn, library, unavailable = spec
    if unavailable:
        pytest.skip(f"{provider}: {unavailable}")
    c = _case(seq_len, heads, kv_heads, prefix)
    extra = {"seq_len": seq_len, "num_seqs": c.num_seqs, "heads": heads, "kv_heads": kv_heads, "K": prefix}
    if provider == "flex":
        extra["flex_block_mask_ms"] = _flex_setup(c)
    extra["backend"] = _backend(provider, fn, c)
    run = _runner(fn, c, mode)

    def timed():
        run()
        if CUDA:
            torch.cuda.synchronize()

    for _ in range(3):
        timed()  # warm-up: compiles, autotuning, allocator
    benchmark.pedantic(timed, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
    shape = f"S{c.num_seqs}xL{seq_len} H{heads}/{kv_heads} D{HEAD_DIM} K{prefix}"
    benchmark.extra_info.update(timed_info(
        provider, mode, shape, str(DTYPE).removeprefix("torch."), device_name(), library_version(library),
        flops=_flops(seq_len, c.num_seqs, heads, prefix, mode),
        peak_extra_bytes=cuda_peak_extra_bytes(timed) if CUDA else None, **extra))


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
