"""Every input rule of the public ops raises the promised error, naming the argument. One case per rule."""

import pytest
import torch

import pdfkernels


def _attention(**overrides):
    b, h, hkv, length, d, n, k = 2, 4, 2, 5, 8, 3, 2
    args = dict(q=torch.randn(b, h, length, d), k=torch.randn(b, hkv, length, d), v=torch.randn(b, hkv, length, d),
                prefix_k=torch.randn(n, hkv, k, d), prefix_v=torch.randn(n, hkv, k, d),
                path_ids=torch.tensor([0, 2]))
    kwargs = {}
    for name, value in overrides.items():
        (args if name in args else kwargs)[name] = value
    return lambda: pdfkernels.prefix_attention(*args.values(), **kwargs)


def _varlen(**overrides):
    hkv, d, n = 1, 8, 2
    args = dict(q=torch.randn(6, 2, d), k=torch.randn(6, hkv, d), v=torch.randn(6, hkv, d),
                prefix_k=torch.randn(n, hkv, 3, d), prefix_v=torch.randn(n, hkv, 3, d),
                cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32), max_seqlen=4, path_ids=torch.tensor([1, 0]))
    args.update(overrides)
    return lambda: pdfkernels.prefix_attention_varlen(*args.values())


def _gaussian(op, shape=(2, 3, 4), **overrides):
    args = dict(y=torch.randn(*shape), mu=torch.randn(*shape), logvar=torch.randn(*shape))
    args.update(overrides)
    return lambda: getattr(pdfkernels, op)(*args.values())


CASES = [
    # prefix_attention
    ("q not a tensor", _attention(q=[1.0]), TypeError, "'q' expected a torch.Tensor"),
    ("q wrong rank", _attention(q=torch.randn(2, 4, 5)), ValueError, "'q' expected 4 dimensions"),
    ("q integer dtype", _attention(q=torch.ones(2, 4, 5, 8, dtype=torch.int32)), TypeError, "'q' expected dtype"),
    ("k dtype differs", _attention(k=torch.randn(2, 2, 5, 8, dtype=torch.float16)), TypeError, "'k' expected dtype"),
    ("k on another device", _attention(k=torch.randn(2, 2, 5, 8, device="meta")), ValueError,
     "'k' expected device"),
    ("k batch differs", _attention(k=torch.randn(3, 2, 5, 8)), ValueError, "'k' expected size B=2"),
    ("k length differs", _attention(k=torch.randn(2, 2, 6, 8)), ValueError, "'k' expected size L=5"),
    ("k head_dim differs", _attention(k=torch.randn(2, 2, 5, 4)), ValueError, "'k' expected size D=8"),
    ("v shape differs from k", _attention(v=torch.randn(2, 1, 5, 8)), ValueError, "'v' expected the shape of k"),
    ("H not divisible by Hkv", _attention(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError,
     "divisible by kv heads"),
    ("prefix_k kv heads differ", _attention(prefix_k=torch.randn(3, 1, 2, 8)), ValueError,
     "'prefix_k' expected size Hkv=2"),
    ("prefix_k head_dim differs", _attention(prefix_k=torch.randn(3, 2, 2, 4)), ValueError,
     "'prefix_k' expected size D=8"),
    ("prefix_v shape differs", _attention(prefix_v=torch.randn(3, 2, 4, 8)), ValueError,
     "'prefix_v' expected the shape of prefix_k"),
    ("prefix with no path", _attention(prefix_k=torch.randn(0, 2, 2, 8), prefix_v=torch.randn(0, 2, 2, 8)),
     ValueError, "N >= 1"),
    ("prefix dtype differs", _attention(prefix_v=torch.randn(3, 2, 2, 8, dtype=torch.bfloat16)), TypeError,
     "'prefix_v' expected dtype"),
    ("path_ids float", _attention(path_ids=torch.tensor([0.0, 1.0])), TypeError, "'path_ids' expected an integer"),
    ("path_ids wrong length", _attention(path_ids=torch.tensor([0, 1, 2])), ValueError,
     "'path_ids' expected shape [B=2]"),
    ("path_ids too large", _attention(path_ids=torch.tensor([0, 3])), ValueError,
     "'path_ids' expected values in [0, N=3)"),
    ("path_ids negative", _attention(path_ids=torch.tensor([-1, 0])), ValueError, "got values in [-1, 0]"),
    ("mask not bool", _attention(key_padding_mask=torch.ones(2, 5)), TypeError,
     "'key_padding_mask' expected dtype torch.bool"),
    ("mask wrong shape", _attention(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     "'key_padding_mask' expected size L=5"),
    ("causal not bool", _attention(causal=1), TypeError, "'causal' expected a bool"),
    ("scale not a number", _attention(softmax_scale="0.1"), TypeError, "'softmax_scale' expected a float"),
    ("scale not positive", _attention(softmax_scale=0.0), ValueError, "'softmax_scale' expected a finite value > 0"),
    # prefix_attention_varlen
    ("varlen q wrong rank", _varlen(q=torch.randn(6, 2, 8, 1)), ValueError, "'q' expected 3 dimensions"),
    ("varlen k tokens differ", _varlen(k=torch.randn(5, 1, 8)), ValueError, "'k' expected size T=6"),
    ("cu_seqlens int64", _varlen(cu_seqlens=torch.tensor([0, 2, 6])), TypeError,
     "'cu_seqlens' expected dtype torch.int32"),
    ("cu_seqlens too short", _varlen(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "S >= 1"),
    ("cu_seqlens not from 0", _varlen(cu_seqlens=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError,
     "start at 0 and end at T=6"),
    ("cu_seqlens not to T", _varlen(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError,
     "start at 0 and end at T=6"),
    ("cu_seqlens decreasing", _varlen(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32),
                                      path_ids=torch.tensor([0, 0, 0])), ValueError, "non-decreasing"),
    ("max_seqlen too small", _varlen(max_seqlen=3), ValueError, "'max_seqlen' expected >= the longest sequence (4)"),
    ("max_seqlen not int", _varlen(max_seqlen=4.0), TypeError, "'max_seqlen' expected an int"),
    ("varlen path_ids per sequence", _varlen(path_ids=torch.tensor([0])), ValueError,
     "'path_ids' expected shape [S=2]"),
    # Gaussian ops
    ("pairwise wrong rank", _gaussian("gaussian_loglik_pairwise"), ValueError, "'y' expected 2 dimensions [B, d]"),
    ("pairwise mu shape", _gaussian("gaussian_loglik_pairwise", (3, 4), mu=torch.randn(3, 5)), ValueError,
     "'mu' expected the shape of y"),
    ("mim N < 2", _gaussian("mim_loss", (1, 3, 4)), ValueError, "N >= 2"),
    ("mim B < 2", _gaussian("mim_loss", (2, 1, 4)), ValueError, "B >= 2"),
    ("mim logvar shape", _gaussian("mim_loss", logvar=torch.randn(2, 3, 5)), ValueError,
     "'logvar' expected the shape of y"),
    ("mim dtype differs", _gaussian("mim_loss", mu=torch.randn(2, 3, 4, dtype=torch.float16)), TypeError,
     "'mu' expected dtype"),
    ("estimator N < 2", _gaussian("estimator_nll", (1, 3, 4)), ValueError, "N >= 2"),
    ("estimator d = 0", _gaussian("estimator_nll", (2, 3, 0)), ValueError, "d >= 1"),
]


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_named_error(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_good_inputs_pass_validation():
    assert _attention()().shape == (2, 4, 5, 8)
    assert _varlen()().shape == (6, 2, 8)
    assert _gaussian("mim_loss")().shape == ()
