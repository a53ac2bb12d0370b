"""The Triton prefix-attention path under any strides: each tensor's own layout is honoured (or copied).

Every case builds its inputs as views of leaf tensors (transposes, batch expansions, strided slices, one fused
qkv buffer, non-contiguous index tensors) and compares the output and the gradients of every leaf with the
float64 reference, kernel outputs poisoned with NaN. A wrong stride can corrupt memory and crash the
interpreter, so each case runs in its own subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pdfkernels
from pdfkernels import reference, settings
from pdfkernels.packing import cu_seqlens_from_lengths

ROOT = Path(__file__).resolve().parents[1]
B, H, HKV, L, D, N, K = 2, 4, 2, 11, 64, 2, 5


def _rand(*shape):
    return torch.randn(*shape)


def _prefix():
    return _rand(N, HKV, K, D), _rand(N, HKV, K, D)


def _padded(q, k, v, pk, pv, paths, mask=None, lib=pdfkernels):
    return lib.prefix_attention(q, k, v, pk, pv, paths, key_padding_mask=mask)


# each case: (leaf tensors, fn(leaves, lib) -> output); lib is pdfkernels or the reference
def case_v_transposed():
    """k contiguous [B, Hkv, L, D], v the transpose of a [B, L, Hkv, D] buffer: different strides."""
    leaves = [_rand(B, H, L, D), _rand(B, HKV, L, D), _rand(B, L, HKV, D), *_prefix()]
    paths = torch.tensor([1, 0])
    return leaves, lambda t, lib: _padded(t[0], t[1], t[2].transpose(1, 2), t[3], t[4], paths, lib=lib)


def case_k_expanded():
    """k (and v) broadcast along the batch: stride 0, gradients summed over the batch by autograd."""
    leaves = [_rand(B, H, L, D), _rand(1, HKV, L, D), _rand(B, HKV, L, D), *_prefix()]
    paths = torch.tensor([0, 1])
    return leaves, lambda t, lib: _padded(t[0], t[1].expand(B, -1, -1, -1), t[2], t[3], t[4], paths, lib=lib)


def case_q_expanded():
    leaves = [_rand(1, H, L, D), _rand(B, HKV, L, D), _rand(1, HKV, L, D), *_prefix()]
    paths = torch.tensor([1, 1])
    return leaves, lambda t, lib: _padded(t[0].expand(B, -1, -1, -1), t[1], t[2].expand(B, -1, -1, -1), t[3],
                                          t[4], paths, lib=lib)


def case_q_every_other_token():
    """``q = big[:, :, ::2]``: a non-dense view, so its gradient buffer is contiguous and not q's strides."""
    leaves = [_rand(B, H, 2 * L, D), _rand(B, HKV, L, D), _rand(B, HKV, L, D), *_prefix()]
    paths = torch.tensor([0, 1])
    return leaves, lambda t, lib: _padded(t[0][:, :, ::2], t[1], t[2], t[3], t[4], paths, lib=lib)


def case_fused_qkv():
    """q, k, v as head slices of one ``[B, L, H + 2 Hkv, D]`` projection output."""
    leaves = [_rand(B, L, H + 2 * HKV, D), *_prefix()]
    paths = torch.tensor([1, 0])

    def fn(t, lib):
        qkv = t[0].transpose(1, 2)
        return _padded(qkv[:, :H], qkv[:, H:H + HKV], qkv[:, H + HKV:], t[1], t[2], paths, lib=lib)
    return leaves, fn


def case_strided_index_tensors():
    """Non-contiguous path_ids and key padding mask, and non-contiguous (and last-dim strided) prefixes."""
    leaves = [_rand(B, H, L, D), _rand(B, HKV, L, D), _rand(B, HKV, L, D), _rand(N, HKV, D, K), _rand(N, HKV, K, D)]
    paths = torch.tensor([[1, 0], [0, 1]])[:, 0]
    mask = torch.ones(B, 2 * L, dtype=torch.bool)
    mask[0, :6] = False  # left padding of row 0 on the even columns
    mask[1, 14:] = False  # right padding of row 1
    mask = mask[:, ::2]
    assert not paths.is_contiguous() and not mask.is_contiguous()
    return leaves, lambda t, lib: _padded(t[0], t[1], t[2], t[3].transpose(2, 3), t[4], paths, mask, lib=lib)


def case_strided_upstream_gradient():
    """The incoming gradient has its own strides (a transposed buffer), unlike the output's."""
    leaves = [_rand(B, H, L, D), _rand(B, HKV, L, D), _rand(B, HKV, L, D), *_prefix()]
    paths = torch.tensor([0, 0])
    return leaves, lambda t, lib: _padded(t[0], t[1], t[2], t[3], t[4], paths, lib=lib).transpose(1, 2)


LENGTHS = [3, 9, 1]
T = sum(LENGTHS)


def _varlen(q, k, v, pk, pv, cu, paths, lib):
    return lib.prefix_attention_varlen(q, k, v, pk, pv, cu, max(LENGTHS), paths)


def case_varlen_strided_heads():
    """Packed q taking every other head of a wider buffer, k/v slices of one fused kv buffer."""
    leaves = [_rand(T, 2 * H, D), _rand(T, 2 * HKV, D), *_prefix()]
    cu, paths = cu_seqlens_from_lengths(LENGTHS), torch.tensor([1, 0, 1])
    return leaves, lambda t, lib: _varlen(t[0][:, ::2], t[1][:, :HKV], t[1][:, HKV:], t[2], t[3], cu, paths, lib)


def case_varlen_strided_offsets():
    """A non-contiguous cu_seqlens (a column of a wider table) and path_ids."""
    leaves = [_rand(T, H, D), _rand(T, HKV, D), _rand(T, HKV, D), *_prefix()]
    cu = torch.stack([cu_seqlens_from_lengths(LENGTHS)] * 2, dim=1)[:, 1]
    paths = torch.tensor([[0, 1], [1, 1], [1, 0]])[:, 0]
    assert not cu.is_contiguous() and not paths.is_contiguous()
    return leaves, lambda t, lib: _varlen(t[0], t[1], t[2], t[3], t[4], cu, paths, lib)


def case_varlen_token_major_views():
    """Packed inputs that are transposes of ``[H, T, D]`` buffers (token stride D, head stride T·D)."""
    leaves = [_rand(H, T, D), _rand(HKV, T, D), _rand(T, HKV, D), *_prefix()]
    cu, paths = cu_seqlens_from_lengths(LENGTHS), torch.tensor([0, 1, 0])
    return leaves, lambda t, lib: _varlen(t[0].transpose(0, 1), t[1].transpose(0, 1), t[2], t[3], t[4], cu, paths,
                                          lib)


CASES = sorted(name[5:] for name in globals() if name.startswith("case_"))


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def run_case(name: str, dtype: torch.dtype) -> None:
    """Output and every leaf gradient of case ``name`` against the float64 reference (raises on a mismatch)."""
    leaves, fn = globals()[f"case_{name}"]()
    ours_in = [t.to(dtype).requires_grad_() for t in leaves]
    ref_in = [t.to(dtype).double().requires_grad_() for t in leaves]
    out = fn(ours_in, pdfkernels)
    ref = fn(ref_in, reference)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, ours_in, upstream)
    ref_grads = torch.autograd.grad(ref, ref_in, upstream.double())
    tol = _tol(dtype)
    for what, ours, want in [("out", out, ref), *((f"grad {i}", g, r) for i, (g, r) in
                                                  enumerate(zip(grads, ref_grads)))]:
        assert ours.dtype == dtype and ours.shape == want.shape, what
        assert torch.isfinite(ours).all(), f"{name} {what}: non-finite (an unwritten element?)"
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(ours.double(), want.detach(), rtol=tol, atol=tol * scale,
                                   msg=lambda m, w=what: f"{name} {w}: {m}")


SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_default_device({device!r})
torch.manual_seed({seed})
from tests.test_prefix_attention_layouts import run_case
from pdfkernels import settings
run_case({name!r}, getattr(torch, {dtype!r}))
print("ok")
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CASES)
def test_layout_matches_reference(name, dtype, kernel_device, fresh_seed):
    if dtype == "bfloat16" and name not in ("fused_qkv", "v_transposed", "varlen_strided_heads"):
        pytest.skip("16-bit runs a representative subset (the strides do not depend on the dtype)")
    env = {**os.environ, settings.BACKEND.name: "triton", settings.POISON.name: "1"}
    if kernel_device.type != "cuda":
        env["TRITON_INTERPRET"] = "1"
    script = SCRIPT.format(root=str(ROOT), device=str(kernel_device), seed=fresh_seed, name=name, dtype=dtype)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), \
        f"{name} ({dtype}) exited {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"


@pytest.fixture
def triton_path(monkeypatch, kernel_device):
    monkeypatch.setenv(settings.BACKEND.name, "triton")
    return kernel_device


def test_double_backward_raises_a_clear_error(triton_path):
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k, v = torch.randn(1, 1, 5, 16, requires_grad=True), torch.randn(1, 1, 5, 16)
    p = torch.randn(1, 1, 2, 16)
    out = pdfkernels.prefix_attention(q, k, v, p, p, torch.tensor([0]))
    dq, dk = torch.autograd.grad(out.square().sum(), (q, k), create_graph=True)
    assert dq.requires_grad, "a gradient penalty must not be silently dropped"
    reference_dq = torch.autograd.grad(reference.prefix_attention(q, k, v, p, p, torch.tensor([0])).square().sum(),
                                       q)[0]
    torch.testing.assert_close(dq.detach(), reference_dq, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="first-order gradients only.*create_graph=True"):
        (dq.square().sum() + dk.sum()).backward()


def test_first_order_backward_is_unchanged_without_create_graph(triton_path):
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    x = torch.randn(1, 1, 5, 16)
    p = torch.randn(1, 1, 2, 16)
    (dq,) = torch.autograd.grad(pdfkernels.prefix_attention(q, x, x, p, p, torch.tensor([0])).sum(), q)
    assert not dq.requires_grad and dq.grad_fn is None
