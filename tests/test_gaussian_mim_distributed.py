"""mim_loss across two gloo processes equals one process on the union batch: loss and every gradient."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pdfkernels
from pdfkernels import backend, settings

SPLIT = (3, 6)  # unequal per-rank batches: the counts travel with the statistics


def _worker(rank: int, world: int, init_file: str, inputs, use_triton: bool, results) -> None:
    os.environ[settings.BACKEND.name] = "triton" if use_triton else "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(SPLIT[:rank])
        local = [t[:, start:start + SPLIT[rank]].clone().requires_grad_() for t in inputs]
        loss = pdfkernels.mim_loss(*local)  # the initialised default group is used
        loss.backward()
        try:  # second order across ranks is refused, never silently wrong
            torch.autograd.grad(pdfkernels.mim_loss(*local), local, create_graph=True)
            refusal = ""
        except RuntimeError as error:
            refusal = str(error)
        results[rank] = (loss.detach(), refusal, *(t.grad for t in local))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_two_ranks_equal_union_batch(use_triton, monkeypatch):
    """gloo on CPU tensors: the Triton variant runs the kernels under the interpreter."""
    if use_triton and not backend.interpreting():
        pytest.skip("with CUDA present the interpreter is off, and gloo's CPU tensors cannot reach the kernels")
    n, d = 3, 10
    b = sum(SPLIT)
    inputs = [torch.randn(n, b, d), torch.randn(n, b, d), torch.rand(n, b, d) * 2 - 1]
    monkeypatch.setenv(settings.BACKEND.name, "triton" if use_triton else "torch")
    union = [t.clone().requires_grad_() for t in inputs]
    union_loss = pdfkernels.mim_loss(*union)
    union_loss.backward()

    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), inputs, use_triton, results), nprocs=2)
        for rank in range(2):
            loss, refusal, *grads = results[rank]
            assert "second-order gradients (create_graph=True) are not supported under torch.distributed" in refusal
            assert loss.item() == pytest.approx(union_loss.item(), rel=1e-5, abs=1e-6)
            start = sum(SPLIT[:rank])
            for g, u in zip(grads, union):
                torch.testing.assert_close(g, u.grad[:, start:start + SPLIT[rank]], rtol=1e-5, atol=1e-6)
