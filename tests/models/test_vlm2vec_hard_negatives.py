"""Hard negatives inside VLM2Vec's trainer structure (``pdfkernels.integrations.vlm2vec`` on the doubles of
``vlm2vec_trainer_doubles.py``): loss and gradients equal the objective written out in float64 on the union
batch, in both collator layouts; two gloo processes equal it too (negatives gathered across ranks, a row with
fewer negatives counted and left out, a row with more cut to the first H); batches without the asked
negatives are refused with what they hold."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pdfkernels import models
from pdfkernels.integrations import vlm2vec
from pdfkernels.integrations.vlm2vec_inputs import NegativesError, split_inputs
from tests.models.test_vlm2vec_trainer import Record, _free_port
from tests.models.vlm2vec_trainer_doubles import (
    Collator,
    GradCacheTrainer,
    MMEBModel,
    ModelArgs,
    add_negatives,
    gloo_rank,
    make_rows,
    training_args,
)

H = 2
OBJECTIVE = dict(num_paths=2, prefix_len=3, lambda_mim=0.1, estimator_steps=1, estimator_lr=1e-3, hard_negatives=H)
BATCH = 4  # per rank; GradCache chunks of 2
TEMPERATURE = 0.02  # the doubles' MMEBModel's


def _rows(counts: list[int], seed: int) -> list[dict]:
    return add_negatives(make_rows(len(counts), seed=seed), counts, seed=seed + 100)


def _trainer(folder, rows, layout, **overrides):
    cls = vlm2vec.pdf_trainer(GradCacheTrainer, **OBJECTIVE)
    record, model_args = Record(), ModelArgs()
    trainer = cls(model=MMEBModel.build(model_args), args=training_args(str(folder), **overrides),
                  train_dataset=rows, data_collator=Collator("right", layout, H), model_args=model_args,
                  callbacks=[record])
    record.trainer = trainer
    return trainer, record


def _info_nce64(q: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Per query k: -log softmax of cosine / temperature over [every target; every negative] at target k."""
    candidates = torch.cat([t, negatives])
    sims = (q / q.norm(dim=-1, keepdim=True)) @ (candidates / candidates.norm(dim=-1, keepdim=True)).T / TEMPERATURE
    return (torch.logsumexp(sims, dim=1) - sims.diagonal()).mean()


def _float64_reference(rows: list[dict]):
    """The objective on the union batch in one process, no chunks or gathers, the loss written out in float64:
    each query's first H negatives (fewer where it has fewer) join every query's candidates."""
    objective = vlm2vec.objective_of(**OBJECTIVE)
    model = models.apply_pdf(MMEBModel.build(ModelArgs()), 2, 3, seed=objective.seed)
    aggregator, estimator = vlm2vec.build_heads(model, objective)
    collate = Collator("right")
    qry, tgt = collate(rows)
    negs = [n for r in rows for n in r["neg"][:H]]
    q, t = (models.encode(model, batch, [0, 1]) for batch in (qry, tgt))  # [N, rows, d]
    n = models.encode(model, collate._batch(negs), [0, 1]) if negs else q[:, :0]
    optimizer = torch.optim.AdamW(estimator.parameters(), lr=objective.estimator_lr)
    optimizer.zero_grad()
    ((estimator.estimator_loss(q) + estimator.estimator_loss(t)) / 2).backward()
    optimizer.step()
    agg64 = copy.deepcopy(aggregator).double()
    q64, t64, n64 = q.double(), t.double(), n.double()
    loss = _info_nce64(agg64(q64), agg64(t64), agg64(n64) if negs else n64[0])
    loss = loss + sum(_info_nce64(q64[i], t64[i], n64[i]) for i in range(2)) / 2
    loss = loss + objective.lambda_mim * ((estimator.mim_loss(q) + estimator.mim_loss(t)) / 2).double()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads.update({f"aggregator.{n}": p.grad.float() for n, p in agg64.named_parameters()})
    return loss.detach(), grads


def _assert_step(step: dict, loss: torch.Tensor, grads: dict) -> None:
    assert abs(step["metrics"]["loss"] - loss.item()) <= 2e-5 * abs(loss.item()), step["metrics"]
    assert set(step["grads"]) == set(grads) and any("pdf_prefix" in name for name in grads)
    for name, grad in grads.items():  # fp32 against float64: the lean trainer's tolerances (step_oracle.py)
        torch.testing.assert_close(step["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("layout", ["batch", "grouped"])
def test_loss_and_gradients_equal_the_float64_objective(tmp_path, layout):
    rows = _rows([H] * BATCH, seed=7)
    trainer, record = _trainer(tmp_path, rows, layout)
    trainer.train()
    loss, grads = _float64_reference(rows)
    _assert_step(record.steps[0], loss, grads)
    assert record.steps[0]["metrics"]["negatives_skipped"] == 0
    plain = _float64_reference([{**r, "neg": []} for r in rows])[0]  # the negatives entered the loss
    assert plain.item() < loss.item() - 1e-3


def _worker(rank, world, port, folder, counts):
    with gloo_rank(rank, world, port):
        rows = _rows(counts, seed=8)[rank * BATCH:(rank + 1) * BATCH]
        trainer, record = _trainer(folder, rows, "grouped", ddp_backend="gloo")
        trainer.train()
        torch.save(record.steps[0], os.path.join(folder, f"rank{rank}.pt"))


def test_two_gloo_processes_equal_the_float64_objective_on_the_union_batch(tmp_path):
    # rank 0: one query with a single negative (its missing one counted, left out); rank 1: one with three
    # (the batch's M is 3: the first 2 of each are used)
    counts = [2, 1, 2, 2, 2, 3, 2, 2]
    world = 2
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path), counts), nprocs=world,
                       start_method="fork")
    loss, grads = _float64_reference(_rows(counts, seed=8))
    for rank in range(world):
        step = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        _assert_step(step, loss, grads)
        assert step["metrics"]["negatives_skipped"] == 1


def _batch(count: int, **extra) -> dict:
    return {"input_ids": torch.ones(count, 3, dtype=torch.long), "attention_mask": torch.ones(count, 3), **extra}


@pytest.mark.parametrize("inputs,h,message", [
    ((_batch(2), _batch(2)), 2, r"hard_negatives=2 but the batch holds no negatives \(2 queries, 2 targets\)"),
    ((_batch(2), _batch(4)), 2, r"hard_negatives=2 expected at least 2 negatives per query, the batch holds 1"),
    ((_batch(2), _batch(6)), 0, r"the targets hold 2 negatives per query .* but hard_negatives is 0"),
    ((_batch(2), _batch(2), _batch(3)), 2, r"hard_negatives=2 expected 2·2 = 4 negative rows for 2 queries, got 3"),
    ((_batch(2), _batch(2), _batch(4)), 0, r"the collator gives a negatives batch but hard_negatives is 0"),
    ((_batch(2), _batch(5)), 1, r"5 target rows for 2 queries"),
])
def test_batches_without_the_asked_negatives_are_refused_saying_what_they_hold(inputs, h, message):
    with pytest.raises(NegativesError, match="pdf_trainer: " + message):
        split_inputs(inputs, h)


def test_the_grouped_layout_gives_positives_the_first_h_negatives_and_their_padding():
    rows = _rows([3, 1], seed=9)
    qry, tgt = Collator("right", "grouped")(rows)  # groups of 1 + 3 rows
    _, positives, negatives, valid = split_inputs((qry, tgt), H)
    want_pos, want_neg = Collator("right")._batch([r["tgt"] for r in rows]), [r["neg"][:H] for r in rows]
    pad = tgt["input_ids"].shape[1]
    assert torch.equal(positives["input_ids"], F.pad(want_pos["input_ids"], (0, pad - want_pos["input_ids"].shape[1])))
    assert valid.tolist() == [True, True, True, False]
    assert positives["text"] == ["pos", "pos"] and negatives["text"] == ["neg", "neg", "neg", ""]
    assert negatives["input_ids"][0, :len(want_neg[0][0])].tolist() == want_neg[0][0]
    assert negatives["input_ids"][2, :len(want_neg[1][0])].tolist() == want_neg[1][0]
