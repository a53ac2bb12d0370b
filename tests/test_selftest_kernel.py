"""The self-test kernel runs (under the interpreter on a CPU) and matches PyTorch in every registered dtype."""

import pytest
import torch

from pdfkernels._selftest_kernel import axpy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_axpy_matches_torch(dtype):
    n = 2500  # not a multiple of the block: the masked tail is exercised
    x, y = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    out = axpy(0.5, x, y)
    expected = (0.5 * x.float() + y.float()).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=torch.finfo(dtype).eps * 8)
