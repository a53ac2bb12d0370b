"""Hit@1, NDCG@5 and Recall@k against numbers computed by hand, ties against the query, and Hit@1 equal to
the evaluation's Precision@1 (``hits``) on MMEB rows."""

import math

import pytest
import torch

from pdfkernels.train.evaluate import hits
from pdfkernels.train.ranking import ranking_metrics


def test_graded_relevance_by_hand():
    # query 0 ranks candidates 3, 1, 0, 2, 4, 5 (scores below); relevant: 1 (gain 2) and 2 (gain 1)
    scores = torch.tensor([[0.5, 0.8, 0.4, 0.9, 0.3, 0.1],
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5]])
    gains = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0, 0.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    got = ranking_metrics(scores, gains)
    # row 0: ranked gains 0, 2, 0, 1, 0: DCG = 2/log2(3) + 1/log2(5); ideal 2, 1: 2/log2(2) + 1/log2(3)
    ndcg0 = (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3))
    assert got["hit@1"] == pytest.approx(0.5)  # row 0 misses (candidate 3 first), row 1 hits
    assert got["ndcg@5"] == pytest.approx((ndcg0 + 1.0) / 2)
    assert got["recall@1"] == pytest.approx((0 + 1) / 2)
    assert got["recall@5"] == pytest.approx((2 / 2 + 1) / 2)
    assert got["recall@10"] == pytest.approx(1.0)


def test_ties_go_against_the_query_and_invalid_candidates_never_rank():
    scores = torch.tensor([[0.7, 0.7, 0.1], [0.2, 0.9, 0.1]])
    gains = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, False, True]])  # row 1: candidate 1 is a copy
    got = ranking_metrics(scores, gains, valid)
    assert got["hit@1"] == pytest.approx(0.5)  # row 0 ties its rival: no hit; row 1's rival is invalid
    assert got["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    with pytest.raises(ValueError, match="at least one relevant"):
        ranking_metrics(scores, torch.zeros_like(scores))


def test_hit_at_1_equals_precision_at_1_on_mmeb_rows():
    torch.manual_seed(0)
    queries, candidates = torch.randn(20, 8), torch.randn(30, 8)
    cands_of = [torch.randperm(30)[:1 + i % 6].tolist() for i in range(20)]
    cands_of[3] = [5, 5, 7]  # a copy of the positive is no rival
    width = max(map(len, cands_of))
    index = torch.tensor([c + [c[0]] * (width - len(c)) for c in cands_of])
    scores = (queries @ candidates.T).gather(1, index)
    gains = torch.zeros_like(scores)
    gains[:, 0] = 1
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[:, 1:] = index[:, 1:] != index[:, :1]
    expected = hits(queries, candidates, cands_of).double().mean()
    assert ranking_metrics(scores, gains, valid)["hit@1"] == pytest.approx(float(expected))


@pytest.mark.parametrize("scores", [[1, 0], [1.0, -1.0, 0.0], [0, 0, 0], [True, 0, 0], [float("inf"), 0, 0],
                                    [float("nan"), 1, 0], "1,0,0", [1, "0", 0]])
def test_bad_rel_scores_are_bad_rows_naming_the_field(scores):
    from pdfkernels.train.rows import BadRow, check_eval_row

    row = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b", "c"], "tgt_img_path": ["", "", ""],
           "rel_scores": scores}
    with pytest.raises(BadRow, match=r"e line 1: 'rel_scores' expected a list of 3 finite numbers >= 0"):
        check_eval_row(row, "e line 1")
    assert check_eval_row({**row, "rel_scores": [0, 2, 1]}, "e line 1")["rel_scores"] == [0.0, 2.0, 1.0]
