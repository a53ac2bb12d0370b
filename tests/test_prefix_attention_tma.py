"""The tensor-descriptor (TMA) kernels of the padded layout, run under the interpreter with
``PDFKERNELS_TMA=1`` against the float64 reference, the dispatch that decides when they may run, and the
autotuned choice between them and the pointer kernels.

On a GPU the same kernels run compiled in ``tests/test_gpu.py`` (``auto`` mode on sm_90).
"""

import pytest
import torch

import pdfkernels
from pdfkernels import autotune, reference, settings
from pdfkernels import prefix_attention_tiles as tiles
from pdfkernels import prefix_attention_tma as tma_policy
from pdfkernels.packing import cu_seqlens_from_lengths
from pdfkernels.registry import configs_for
from tests.test_prefix_attention import _check_grads, _hf_layout, check_padded_case


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch, kernel_device):
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    return kernel_device


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, whether it got descriptors) for every kernel launch, spied on the descriptor step."""
    seen = []
    real = tma_policy.descriptors

    def spy(kernel, params, tensors):
        seen.append((kernel.fn.__name__, params["TMA"]))
        return real(kernel, params, tensors)

    monkeypatch.setattr(tma_policy, "descriptors", spy)
    return seen


@pytest.fixture
def tma_first(monkeypatch):
    """Every kernel that ships a descriptor variant (with this Triton) launches it, whichever is the default."""
    real = tiles.candidates

    def ordered(*args):
        return sorted(real(*args), key=lambda c: not c.constexprs["TMA"])

    monkeypatch.setattr(tiles, "candidates", ordered)


def _expected(k: int) -> list[tuple[str, bool]]:
    kernels = [pdfkernels.prefix_attention_kernels.prefix_attention_fwd_kernel,
               pdfkernels.prefix_attention_kernels.prefix_attention_bwd_dkdv_kernel,
               pdfkernels.prefix_attention_kernels.prefix_attention_bwd_dq_kernel]
    kernels += [pdfkernels.prefix_attention_kernels.prefix_attention_bwd_dprefix_kernel] if k else []
    return [(kn.fn.__name__, any(c.constexprs["TMA"] for c in configs_for(kn))) for kn in kernels]


def test_the_forward_and_dprefix_ship_descriptor_variants():
    assert [tma for _, tma in _expected(1)][::3] == [True, True]


TMA_PADDED = [
    # b, heads, kv_heads, L, D, N, K, padding, causal, dtype
    (2, 12, 2, 64, 128, 2, 20, "left", True, torch.bfloat16),  # Qwen2-VL-2B's GQA 12/2
    (1, 6, 1, 300, 64, 2, 20, "none", True, torch.bfloat16),  # several whole tiles and a partial one
    (3, 12, 2, 7, 128, 4, 33, "left", False, torch.float16),  # a partial prefix tile, a short sequence
    (2, 4, 1, 20, 80, 2, 5, "right", True, torch.bfloat16),  # head_dim 80: the box's columns past 80 are zeros
    (2, 8, 2, 33, 128, 1, 0, "none", True, torch.float16),  # no prefix: its descriptors are never read
]


@pytest.mark.parametrize("b,heads,kv_heads,length,d,n,k,padding,causal,dtype", TMA_PADDED,
                         ids=[f"L{c[3]}-K{c[6]}-G{c[1] // c[2]}-D{c[4]}-{c[7]}-{'causal' if c[8] else 'full'}"
                              f"-{str(c[9])[6:]}" for c in TMA_PADDED])
def test_tma_kernels_match_reference(b, heads, kv_heads, length, d, n, k, padding, causal, dtype, monkeypatch,
                                     launches, tma_first):
    monkeypatch.setenv(settings.TMA.name, "1")
    check_padded_case(b, heads, kv_heads, length, d, n, k, padding, causal, dtype)
    assert launches == _expected(k)


def test_inputs_a_descriptor_cannot_describe_take_pointer_loads(monkeypatch, launches):
    """Expanded keys (stride 0) and a query whose base is not 16-byte aligned: pointer kernels, same answer."""
    monkeypatch.setenv(settings.TMA.name, "1")
    b, heads, kv_heads, length, d, n, k, dtype = 2, 4, 2, 40, 64, 2, 20, torch.bfloat16
    flat = torch.randn(b * length * heads * d + 1).to(dtype)
    q = flat[1:].view(b, length, heads, d).transpose(1, 2)  # 2 bytes past an aligned base
    assert q.data_ptr() % 16
    key = torch.randn(b, length, 1, d).to(dtype).expand(b, length, kv_heads, d).transpose(1, 2)
    val = _hf_layout(b, length, kv_heads, d, dtype)
    pk, pv = torch.randn(n, kv_heads, k, d).to(dtype), torch.randn(n, kv_heads, k, d).to(dtype)
    paths = torch.tensor([1, 0])
    leaves = [t.detach().requires_grad_() for t in (q, key, val, pk, pv)]
    out = pdfkernels.prefix_attention(*leaves, paths)
    ref = reference.prefix_attention(*(t.double() for t in (q, key, val, pk, pv)), paths)
    torch.testing.assert_close(out.double(), ref, rtol=0.02, atol=0.02)
    assert dict(launches)["prefix_attention_fwd_kernel"] is False  # the expanded keys
    out.float().sum().backward()
    assert dict(launches)["prefix_attention_bwd_dkdv_kernel"] is False  # the misaligned query


def test_packed_sequences_and_fp32_never_get_descriptors(monkeypatch, launches):
    monkeypatch.setenv(settings.TMA.name, "1")
    lengths, heads, kv_heads, d = [5, 19], 4, 2, 64
    cu = cu_seqlens_from_lengths(lengths)
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(sum(lengths), heads, d).to(dtype).requires_grad_()
        kv = [torch.randn(sum(lengths), kv_heads, d).to(dtype) for _ in range(2)]
        pk, pv = torch.randn(2, kv_heads, 3, d).to(dtype), torch.randn(2, kv_heads, 3, d).to(dtype)
        pdfkernels.prefix_attention_varlen(q, *kv, pk, pv, cu, max(lengths), torch.tensor([0, 1])).sum().backward()
    q, key, val = (_hf_layout(1, 9, 2, d, torch.float32) for _ in range(3))
    pdfkernels.prefix_attention(q, key, val, torch.randn(1, 2, 3, d), torch.randn(1, 2, 3, d), torch.tensor([0]))
    assert launches and not any(tma for _, tma in launches)


def test_auto_mode_keeps_descriptors_to_gpus_and_off_switches_them_off(monkeypatch):
    t = _hf_layout(1, 16, 2, 64, torch.bfloat16)
    cpu = torch.device("cpu")
    monkeypatch.setenv(settings.TMA.name, "auto")
    assert not tma_policy.use_tma(cpu, torch.bfloat16, False, (t,))
    monkeypatch.setenv(settings.TMA.name, "1")
    assert tma_policy.use_tma(cpu, torch.bfloat16, False, (t,))
    monkeypatch.setenv(settings.TMA.name, "0")
    assert not tma_policy.use_tma(cpu, torch.bfloat16, False, (t,))
    monkeypatch.setenv(settings.TMA.name, "yes")
    with pytest.raises(ValueError, match="PDFKERNELS_TMA expected one of"):
        tma_policy.use_tma(cpu, torch.bfloat16, False, (t,))


def test_forcing_descriptors_on_a_gpu_without_tma_is_refused(monkeypatch):
    """``PDFKERNELS_TMA=1`` on an sm_80 GPU (compiled, not interpreted) raises, for every dtype, rather than
    quietly taking the pointer kernels; ``auto`` there takes them."""
    monkeypatch.setattr(tma_policy, "arch_of", lambda device: 80)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call by backend.interpreting()
    t = _hf_layout(1, 16, 2, 64, torch.bfloat16)
    gpu = torch.device("cuda")
    monkeypatch.setenv(settings.TMA.name, "1")
    for dtype in (torch.bfloat16, torch.float32):
        with pytest.raises(RuntimeError, match="PDFKERNELS_TMA=1 .* need sm_90"):
            tma_policy.use_tma(gpu, dtype, False, (t,))
    monkeypatch.setenv(settings.TMA.name, "auto")
    assert not tma_policy.use_tma(gpu, torch.bfloat16, False, (t,))


def test_descriptor_boxes_follow_the_launched_tiles():
    """One box per streamed tile: rows from the kernel's tile, columns BLOCK_D; a size-1 dim gets a valid
    stride (16 bytes) whatever torch reports for it."""
    k = torch.randn(1, 7, 2, 80).to(torch.bfloat16).transpose(1, 2)  # [1, 2, 7, 80]
    params = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 128, "TMA": True}
    (desc,) = tma_policy.descriptors(pdfkernels.prefix_attention_kernels.prefix_attention_fwd_kernel, params, (k,))
    assert desc.block_shape == [1, 1, 32, 128] and list(desc.shape) == [1, 2, 7, 80]
    assert desc.strides == [8, 80, 160, 1]
    (desc,) = tma_policy.descriptors(pdfkernels.prefix_attention_kernels.prefix_attention_bwd_dkdv_kernel, params,
                                  (k,))
    assert desc.block_shape == [1, 1, 64, 128]
    assert tma_policy.descriptors(pdfkernels.prefix_attention_kernels.prefix_attention_fwd_kernel,
                               dict(params, TMA=False), (k,)) == (k,)


def test_gpus_time_every_variant_and_launch_the_fastest(monkeypatch, launches):
    """With autotuning on (faked here: the interpreter never tunes), each launch key times the descriptor
    and pointer variants once, launches the faster one afterwards, and the answer is right either way."""
    monkeypatch.setenv(settings.TMA.name, "1")
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    timed = []

    def fake_bench(fn):  # runs the candidate once; the pointer variants "win"
        before = len(launches)
        fn()
        timed.append(launches[before:])
        return 1.0 if launches[-1][1] else 0.5

    monkeypatch.setattr(autotune, "_bench", fake_bench)
    autotune.clear()
    b, heads, kv_heads, length, d, n, k, dtype = 2, 4, 2, 24, 64, 2, 20, torch.bfloat16
    q, key, val = _hf_layout(b, length, heads, d, dtype), *(_hf_layout(b, length, kv_heads, d, dtype) for _ in "kv")
    pk, pv = torch.randn(n, kv_heads, k, d).to(dtype), torch.randn(n, kv_heads, k, d).to(dtype)
    paths = torch.tensor([0, 1])
    try:
        _check_grads(lambda *t: pdfkernels.prefix_attention(*t, paths),
                     lambda *t: reference.prefix_attention(*t, paths), [q, key, val, pk, pv], dtype)
        chosen = autotune.chosen()
    finally:
        autotune.clear()
    shipped = dict(_expected(k))
    for name, has_tma in shipped.items():
        if has_tma:  # two variants: both timed, the pointer one chosen and launched last
            assert sorted(run[-1][1] for run in timed if run[-1][0] == name) == [False, True]
            assert [tma for kn, tma in launches if kn == name][-1] is False
            (entry,) = [v for (op, _), v in chosen.items() if op == name]
            assert len(entry["times_ms"]) == 2
        else:  # one variant: nothing to time
            assert not any(run[-1][0] == name for run in timed)
