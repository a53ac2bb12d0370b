"""The PDF objective inside VLM2Vec's trainer structure (``pdfkernels.integrations.vlm2vec`` on the doubles of
``vlm2vec_trainer_doubles.py``): two gloo processes equal one process on the union batch, a resume from a
mid-run checkpoint continues bit-exactly, refusals, a bf16 backbone's prefix trains."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import TrainerCallback

from pdfkernels import models
from pdfkernels.integrations import vlm2vec
from tests.models.vlm2vec_trainer_doubles import (
    Collator,
    GradCacheTrainer,
    MMEBModel,
    ModelArgs,
    gloo_rank,
    make_rows,
    training_args,
)

OBJECTIVE = dict(num_paths=2, prefix_len=3, lambda_mim=0.1, estimator_steps=2, estimator_lr=1e-3)
BATCH = 4  # per rank; GradCache chunks of 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Record(TrainerCallback):
    """Per optimizer step: the gradients (model and aggregator), the heads' weights and the PDF terms."""

    def __init__(self):
        self.trainer, self.steps, self.after, self.begin = None, [], [], None

    def _heads(self):
        t = self.trainer
        state = {"prefix": models.pdf_parameters(t.model)[0].detach().clone()}
        for name, head in (("aggregator", t.pdf_aggregator), ("estimator", t.pdf_estimator)):
            if head is not None:  # (no estimator without MIM)
                state.update({f"{name}.{k}": v.detach().clone() for k, v in head.state_dict().items()})
        return state

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = self._heads()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
        grads.update({f"aggregator.{n}": p.grad.detach().clone() for n, p in t.pdf_aggregator.named_parameters()})
        self.steps.append({"grads": grads, "heads": self._heads(), "metrics": dict(t.pdf_metrics)})

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(self._heads())


def _trainer(folder, rows, padding="right", objective=OBJECTIVE, model_args=None, **overrides):
    model_args = model_args or ModelArgs()
    cls = vlm2vec.pdf_trainer(GradCacheTrainer, **objective)
    record = Record()
    trainer = cls(model=MMEBModel.build(model_args), args=training_args(str(folder), **overrides),
                  train_dataset=rows, data_collator=Collator(padding), model_args=model_args, callbacks=[record])
    record.trainer = trainer
    return trainer, record


def _worker(rank, world, port, folder):
    with gloo_rank(rank, world, port):
        rows = make_rows(BATCH * world, seed=1)[rank * BATCH:(rank + 1) * BATCH]
        trainer, record = _trainer(folder, rows, ddp_backend="gloo")
        trainer.train()
        wrapped = type(trainer.model_wrapped).__name__
        torch.save({"step": record.steps[0], "wrapped": wrapped}, os.path.join(folder, f"rank{rank}.pt"))


def _reference(rows):
    """The objective on the union batch in one process, written out directly (no chunks, no gathers)."""
    objective = vlm2vec.PDFObjective(**OBJECTIVE)
    model = models.apply_pdf(MMEBModel.build(ModelArgs()), 2, 3, seed=objective.seed)
    aggregator, estimator = vlm2vec.build_heads(model, objective)
    qry, tgt = Collator("right")(rows)
    q, t = models.encode(model, qry, [0, 1]), models.encode(model, tgt, [0, 1])  # [N, B, d]
    optimizer = torch.optim.AdamW(estimator.parameters(), lr=objective.estimator_lr)
    for _ in range(objective.estimator_steps):
        optimizer.zero_grad()
        ((estimator.estimator_loss(q) + estimator.estimator_loss(t)) / 2).backward()
        optimizer.step()

    def nce(a, b):
        logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.02
        return F.cross_entropy(logits, torch.arange(a.shape[0]))

    loss = nce(aggregator(q), aggregator(t)) + (nce(q[0], t[0]) + nce(q[1], t[1])) / 2
    loss = loss + objective.lambda_mim * (estimator.mim_loss(q) + estimator.mim_loss(t)) / 2
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads.update({f"aggregator.{n}": p.grad for n, p in aggregator.named_parameters()})
    return loss.detach(), grads, {f"estimator.{k}": v for k, v in estimator.state_dict().items()}


def _close(got, expected, what):
    scale = expected.abs().max().clamp(min=1e-12)
    assert ((got - expected).abs().max() / scale).item() <= 2e-5, what


def test_two_gloo_processes_equal_one_process_on_the_union_batch(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    loss, grads, estimator = _reference(make_rows(BATCH * world, seed=1))
    for part in ("pdf_prefix", "lora_B", "lora_magnitude", "aggregator"):
        assert any(part in n and g.abs().sum() > 0 for n, g in grads.items()), f"no gradient reaches {part}"
    for rank in ranks:
        step = rank["step"]
        assert abs(step["metrics"]["loss"] - loss.item()) <= 2e-5 * abs(loss.item()), step["metrics"]
        assert set(step["grads"]) == set(grads)
        assert any("lora" in n for n in grads) and any("pdf_prefix" in n for n in grads)
        for name, grad in grads.items():  # (DoRA's lora_A get none at step 0: lora_B starts at zero)
            _close(step["grads"][name], grad, name)
        for name, value in estimator.items():
            _close(step["heads"][name], value, name)
    for name, value in ranks[0]["step"]["heads"].items():  # the estimator (and all heads) identical on every rank
        assert torch.equal(value, ranks[1]["step"]["heads"][name]), name


def test_resume_from_a_mid_run_checkpoint_continues_bit_exactly(tmp_path):
    rows = make_rows(4 * BATCH, seed=2)
    first, seen = _trainer(tmp_path / "a", rows, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / vlm2vec.PDF_FILE).is_file() and (checkpoint / vlm2vec.ESTIMATOR_OPTIMIZER_FILE).is_file()

    resumed, again = _trainer(tmp_path / "b", rows, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert hasattr(models.anatomy.hf_model(resumed.model), "pdf_prefix"), "the rebuilt model must be patched again"
    for name, value in seen.after[1].items():  # after step 2's update = what checkpoint-2 holds
        assert torch.equal(again.begin[name], value), name
    assert len(again.steps) == 2
    for before, after, before_end, after_end in zip(seen.steps[2:], again.steps, seen.after[2:], again.after):
        assert before["metrics"] == after["metrics"]
        for name, value in before["grads"].items():
            assert torch.equal(after["grads"][name], value), name
        for name, value in before_end.items():
            assert torch.equal(after_end[name], value), name


def test_resumes_across_pdf_and_plain_checkpoints_are_refused(tmp_path):
    rows = make_rows(2 * BATCH, seed=3)
    model_args = ModelArgs()
    plain = GradCacheTrainer(model=MMEBModel.build(model_args), args=training_args(str(tmp_path / "plain"),
                             save_strategy="steps", save_steps=1), train_dataset=rows, data_collator=Collator(),
                             model_args=model_args)
    plain.train()
    pdf, _ = _trainer(tmp_path / "pdf", rows, save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match="holds no pdf.safetensors: it was written by a run without PDF"):
        pdf.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"))
    pdf.train()
    plain_again = GradCacheTrainer(model=MMEBModel.build(model_args), args=training_args(
        str(tmp_path / "plain2"), max_steps=2), train_dataset=rows, data_collator=Collator(), model_args=model_args)
    with pytest.raises(ValueError, match="parameter group"):  # torch's optimizer-state check
        plain_again.train(resume_from_checkpoint=str(tmp_path / "pdf" / "checkpoint-1"))


def test_a_bf16_backbone_prefix_trains_in_the_trainer(tmp_path):
    model_args = ModelArgs(dtype="bfloat16")
    trainer, record = _trainer(tmp_path, make_rows(3 * BATCH, seed=4), model_args=model_args,
                               objective={**OBJECTIVE, "estimator_steps": 1}, max_steps=3, learning_rate=2e-5)
    prefix = models.pdf_parameters(trainer.model)[0]
    assert prefix.dtype == torch.float32
    assert trainer.model.encoder.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    start = prefix.detach().clone()
    trainer.train()
    assert len(record.steps) == 3
    assert bool((prefix.detach() != start).all()), "every prefix element must change in 3 AdamW steps at lr 2e-5"


def test_deploy_the_single_prefix_embedding_from_a_checkpoint(tmp_path):
    trainer, _ = _trainer(tmp_path, make_rows(BATCH, seed=5), save_strategy="steps", save_steps=1)
    trainer.train()
    qry, _ = Collator("right")(make_rows(3, seed=6))
    with torch.no_grad(), models.use_paths(trainer.model, 0):
        expected = trainer.model.encode_input(qry)
    model_args = ModelArgs(checkpoint_path=str(tmp_path / "checkpoint-1"))
    deployed = vlm2vec.load_pdf_weights(MMEBModel.load(model_args, is_trainable=False), model_args.checkpoint_path)
    with torch.no_grad(), models.use_paths(deployed, 0):
        torch.testing.assert_close(deployed.encode_input(qry), expected, rtol=1e-5, atol=1e-6)


def test_only_the_writing_rank_saves(tmp_path, monkeypatch):
    """DeepSpeed's save_model calls _save on every rank: a rank that does not save writes nothing (two ranks
    renaming one temporary file into place raced), and the writing rank writes the PDF files."""
    trainer, _ = _trainer(tmp_path / "run", make_rows(BATCH, seed=7))
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "other-rank"))
    assert not (tmp_path / "other-rank").exists()
    monkeypatch.undo()
    trainer._save(str(tmp_path / "writer"))
    assert {vlm2vec.PDF_FILE, vlm2vec.ESTIMATOR_OPTIMIZER_FILE} <= set(os.listdir(tmp_path / "writer"))
