"""Hard negatives: rows checked at start, the loss and its gradients equal a direct computation (also through
GradCache's chunks), the pipeline's negatives per rank, bad negative images, exact resume. Two gloo ranks equal
one process with hard negatives: tests/train/test_run.py::test_two_gloo_ranks_equal_one_process_on_the_union_batch."""

import copy
import json

import pytest
import torch

import pdfkernels.train.run as run
from pdfkernels import models
from pdfkernels.models.contrastive import info_nce, pdf_contrastive
from pdfkernels.train import synthetic
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader, TrainSampler, example, negatives
from pdfkernels.train.loader import StepShares, TrainBatches
from pdfkernels.train.model import build, make_collator
from pdfkernels.train.rows import BadRow, load_train_rows
from pdfkernels.train.step import collate_chunks, train_step
from tests.train.helpers import run_args, shapes_data_with_negatives
from tests.train.step_oracle import assert_same_step, full_batch_step, trainable_grads

H = 2  # negatives per query in the generated set


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data_with_negatives(tmp_path_factory.getbasetemp())


def _files(data):
    return [str(data / "train" / "t2i.jsonl"), str(data / "train" / "i2t.jsonl")]


# --- rows ---------------------------------------------------------------------------------------------

ROW = {"qry": "a red circle", "qry_image_path": "", "pos_text": "<|image_1|> x", "pos_image_path": "a.png"}


def test_negatives_are_read_as_mmeb_writes_them_and_as_lists(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{**ROW, "neg_text": "<|image_1|> y", "neg_image_path": "b.png"},  # MMEB / VLM2Vec: one string
            {**ROW, "neg_text": ["a blue square", "<|image_1|> z"], "neg_image_path": ["", "c.png"]},
            {**ROW, "neg_text": ["a blue square"]},  # text-only negatives need no image paths
            {**ROW, "neg_text": "", "neg_image_path": ""}]  # no negatives
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_train_rows(str(path))
    assert [(r.get("neg_text"), r.get("neg_image_path")) for r in got] == [
        (["<|image_1|> y"], ["b.png"]), (["a blue square", "<|image_1|> z"], ["", "c.png"]),
        (["a blue square"], [""]), (None, None)]


@pytest.mark.parametrize("row,message", [
    ({**ROW, "neg_text": ["a"], "neg_image_path": ["", "b.png"]},
     "'neg_text' has 1 negatives but 'neg_image_path' has 2"),
    ({**ROW, "neg_text": ["<|image_1|> y"]}, r"'neg_text\[0\]' has <\|image_1\|> but 'neg_image_path\[0\]' is empty"),
    ({**ROW, "neg_text": [3]}, "'neg_text' expected a string or a list of non-empty strings"),
    ({**ROW, "neg_image_path": "b.png"}, "'neg_image_path' is 'b.png' but 'neg_text' is empty"),
    ({**ROW, "neg_text": ["a blue square"]}, "--hard-negatives 2 expected at least 2 negatives in 'neg_text', got 1"),
    ({**ROW, "neg_text": ["<|video_1|> y", "a"]},
     r"'neg_text\[0\]' has <\|video_1\|> but 'neg_video_path \(not read\)' is empty"),
])
def test_bad_negatives_are_named_at_start_or_skipped(tmp_path, row, message):
    path = tmp_path / "t.jsonl"
    good = {**ROW, "neg_text": ["a blue square", "a green cross"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(BadRow, match=f"{path} line 2: " + message):
        load_train_rows(str(path), hard_negatives=2)
    kept = load_train_rows(str(path), policy="skip", hard_negatives=2)
    assert [r["neg_text"] for r in kept] == [good["neg_text"]]


# --- the loss -----------------------------------------------------------------------------------------

def _direct_info_nce(q, t, n, temperature):
    """Per query: -log softmax over [every target; every negative] at its own target, written out."""
    losses = []
    for k in range(q.shape[0]):
        candidates = torch.cat([t, n])
        sims = torch.stack([torch.dot(q[k], c) / (q[k].norm() * c.norm()) for c in candidates]) / temperature
        losses.append(torch.logsumexp(sims, 0) - sims[k])
    return torch.stack(losses).mean()


def test_loss_and_gradients_equal_a_direct_computation():
    """The fp32 loss against the same loss written out in float64 (a copy of the aggregator)."""
    torch.manual_seed(0)
    n_paths, b, d, temperature = 2, 5, 8, 0.1
    q, t, n = (torch.randn(n_paths, rows, d, requires_grad=True) for rows in (b, b, b * H))
    aggregator = models.Aggregator(d, n_paths)
    loss, agg, per_path = pdf_contrastive(q, t, aggregator, temperature, 0.7, negatives=n)
    loss.backward()
    got = [x.grad for x in (q, t, n)] + [p.grad for p in aggregator.parameters()]

    q64, t64, n64 = (x.detach().double().requires_grad_() for x in (q, t, n))
    agg64 = copy.deepcopy(aggregator).double()
    direct_paths = [_direct_info_nce(q64[i], t64[i], n64[i], temperature) for i in range(n_paths)]
    direct_agg = _direct_info_nce(agg64(q64), agg64(t64), agg64(n64), temperature)
    direct = direct_agg + 0.7 * sum(direct_paths) / n_paths
    direct.backward()
    want = [x.grad for x in (q64, t64, n64)] + [p.grad for p in agg64.parameters()]
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    assert agg.item() == pytest.approx(direct_agg.item(), rel=1e-5)
    assert all(g.abs().sum() > 0 for g in got)  # the negatives (and the aggregator through them) get gradients
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-6)
    # the negatives enlarge the denominator; without them it is the in-batch loss
    assert info_nce(q[0], t[0], temperature, n[0]) > info_nce(q[0], t[0], temperature)
    assert info_nce(q[0], t[0], temperature).item() == pytest.approx(
        _direct_info_nce(q64[0], t64[0], n64[0][:0], temperature).item(), rel=1e-5)


def _setup(data, chunk_size):
    config = TrainConfig(prefix_len=3, global_batch=4, chunk_size=chunk_size, max_grad_norm=0.0, temperature=0.1,
                         lambda_mim=0.5, image_dir=str(data / "images"), train_data=_files(data), hard_negatives=H)
    model, tokenizer, processor = build(config, synthetic.all_words(), torch.device("cpu"))
    model.train()
    torch.manual_seed(1)
    parts = run.make_parts(config, model, torch.device("cpu"))
    collator = make_collator(model, tokenizer, processor, 64)
    rows = TrainSampler([load_train_rows(p, hard_negatives=H) for p in config.train_data], None, 0).plan(0, 4)
    loader = ImageLoader(config.image_dir)
    pairs = [example(r, loader) for r in rows]
    negs = [n for r in rows for n in negatives(r, loader, H)]
    return config, parts, collator, [p[0] for p in pairs], [p[1] for p in pairs], negs


def test_gradcache_with_negatives_equals_the_full_batch_step(data):
    config, parts, collator, queries, targets, negs = _setup(data, chunk_size=3)
    metrics = train_step(parts, collate_chunks(collator, queries, 3, "cpu"),
                         collate_chunks(collator, targets, 3, "cpu"), config, torch.device("cpu"),
                         collate_chunks(collator, negs, 3, "cpu"))
    cached = trainable_grads(parts)

    config, ref, collator, queries, targets, negs = _setup(data, chunk_size=8)
    loss, direct, n = full_batch_step(ref, collator, config, queries, targets, negs)
    assert n.shape[1] == H * len(queries)
    assert_same_step(metrics, cached, loss, direct)


# --- the pipeline and whole runs ----------------------------------------------------------------------

def test_each_rank_prepares_its_queries_negatives_in_chunks(data):
    config, _, collator, *_ = _setup(data, chunk_size=3)
    sampler = TrainSampler([load_train_rows(p, hard_negatives=H) for p in _files(data)], None, 4)
    loader = ImageLoader(str(data / "images"))
    plan = sampler.plan(5, 4)
    for rank in (0, 1):
        shares = StepShares(sampler, loader, collator, 4, rank, 2, 3, hard_negatives=H)
        (step, _, _, chunks), = TrainBatches(shares, 5, 6, torch.device("cpu"), num_workers=0)
        expected = [n for row in plan[2 * rank:2 * rank + 2] for n in negatives(row, loader, H)]
        want = [collator(expected[i:i + 3]) for i in range(0, len(expected), 3)]
        assert step == 5 and [c["input_ids"].shape[0] for c in chunks] == [3, 1]
        for a, b in zip(chunks, want):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_negatives_continues_with_the_same_losses(data, tmp_path):
    args = ("--hard-negatives", str(H), "--no-evaluate")
    straight = run.main(run_args(data, tmp_path / "a", "--steps", "4", *args))["history"]
    run.main(run_args(data, tmp_path / "b", "--steps", "4", "--stop-after", "2", *args))
    second = run.main(run_args(data, tmp_path / "b", "--steps", "4", "--resume", *args))["history"]
    assert [m["step"] for m in second] == [3, 4]
    for a, b in zip(straight[2:], second):
        for key in ("loss", "loss_agg", "loss_path", "mi_estimate", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    plain = run.main(run_args(data, tmp_path / "c", "--steps", "1", "--no-evaluate"))["history"]
    assert plain[0]["loss"] != pytest.approx(straight[0]["loss"], rel=1e-3)  # the negatives entered the loss


def test_a_bad_negative_image_replaces_its_row_or_stops_by_flag(data, tmp_path):
    from pdfkernels.train.loader import BadData

    _, _, collator, *_ = _setup(data, chunk_size=4)
    good = load_train_rows(_files(data)[0], hard_negatives=H)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**good[0], "neg_image_path": [good[0]["neg_image_path"][0], "missing.png"]}) + "\n")
    rows = load_train_rows(str(bad), hard_negatives=H)
    loader = ImageLoader(str(data / "images"))
    with pytest.raises(BadData, match=r"bad training image .*missing\.png"):
        StepShares(TrainSampler([rows], None, 0), loader, collator, 2, 0, 1, 4, "error", hard_negatives=H)[0]
    item = StepShares(TrainSampler([rows, good], [1.0, 1.0], 0), loader, collator, 8, 0, 1, 4, "skip",
                      hard_negatives=H)[0]
    assert item["bad"] > 0 and "missing.png" in item["first_bad"]
    assert sum(len(c["parts"]) for c in item["negatives"]) == 8 * H  # every position kept its H negatives
