"""The aggregator of the paper's appendix A.2."""

import pytest
import torch

from pdfkernels.models import Aggregator


def test_weighted_sum_with_softmax_weights():
    agg = Aggregator(8, 3)
    h = torch.randn(3, 5, 8)
    w = agg.weights(h)
    assert w.shape == (5, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    expected = (w.T[:, :, None] * h).sum(0)
    torch.testing.assert_close(agg(h), expected)
    # the score network sees the N embeddings concatenated in path order
    manual = torch.softmax(agg.score(torch.cat([h[0], h[1], h[2]], dim=-1)), -1)
    torch.testing.assert_close(w, manual)


def test_architecture_and_bad_shape():
    agg = Aggregator(8, 2)
    assert [type(m).__name__ for m in agg.score] == ["Linear", "SiLU", "Linear"]
    assert agg.score[0].in_features == 16 and agg.score[2].out_features == 2
    with pytest.raises(ValueError, match=r"'h' expected shape \[N=2, B, d=8\]"):
        agg(torch.randn(3, 4, 8))
