"""The Trainer's flags with the PDF step in VLM2Vec's trainer structure (doubles of
``vlm2vec_trainer_doubles.py``), as the Hugging Face Trainer's own step treats them:
``gradient_accumulation_steps`` (gradients and logged loss the micro-batches' mean), ``--fp16``'s GradScaler
(the cached gradients carry its scale into every chunk; unscaling gives the unscaled step's), and
``max_grad_norm`` (the model's parameters, prefix included, clipped together; the aggregator not)."""

from __future__ import annotations

import torch

from pdfkernels.integrations import vlm2vec
from tests.models.test_vlm2vec_trainer import OBJECTIVE, _trainer
from tests.models.vlm2vec_trainer_doubles import Collator, make_rows

NO_MIM = {**OBJECTIVE, "lambda_mim": 0.0}  # the estimator would move between micro-batches


def _grads(record, step=0) -> dict:
    return record.steps[step]["grads"]


def _assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want) and any("pdf_prefix" in n for n in want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-7, msg=lambda m, k=name: f"{k}: {m}")


def test_gradient_accumulation_averages_the_micro_batches_as_the_trainer_does(tmp_path):
    rows = make_rows(8, seed=11)
    first, a = _trainer(tmp_path / "a", rows[:4], objective=NO_MIM)
    first.train()
    second, b = _trainer(tmp_path / "b", rows[4:], objective=NO_MIM)
    second.train()
    both, ab = _trainer(tmp_path / "ab", rows, objective=NO_MIM, gradient_accumulation_steps=2)
    both.train()
    assert len(ab.steps) == 1
    _assert_close(_grads(ab), {n: (g + _grads(b)[n]) / 2 for n, g in _grads(a).items()})
    logged = [h["loss"] for h in both.state.log_history if "loss" in h][0]
    want = (a.steps[0]["metrics"]["loss"] + b.steps[0]["metrics"]["loss"]) / 2
    assert abs(logged - want) <= 1e-3 * abs(want)  # the Trainer logs 4 significant digits' worth


def test_fp16_scales_the_step_by_the_grad_scaler_and_unscaling_gives_the_plain_step(tmp_path):
    rows = make_rows(4, seed=12)
    inputs = Collator("right")(rows)
    steps = {}
    for fp16 in (False, True):
        trainer, _ = _trainer(tmp_path / str(fp16), rows)
        trainer.create_optimizer()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        if fp16:  # the Trainer's --fp16 on a GPU: accelerate's scaler (fp16 autocast itself needs a GPU)
            object.__setattr__(trainer.args, "fp16", True)
            trainer.accelerator.scaler = scaler
        loss = trainer.training_step(trainer.model, inputs)
        grads = {n: p.grad.clone() for g in trainer.optimizer.param_groups for n, p in
                 zip(range(len(g["params"])), g["params"]) if p.grad is not None}
        if fp16:
            scaler.unscale_(trainer.optimizer)  # what the Trainer's clipping and step do first
        unscaled = [p.grad.clone() for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        steps[fp16] = (loss, grads, unscaled)
    (plain_loss, plain, plain_unscaled), (loss, scaled, unscaled) = steps[False], steps[True]
    assert loss == plain_loss  # the returned loss is never scaled
    assert len(plain_unscaled) == len(unscaled) > 10
    for got, want in zip(unscaled, plain_unscaled):  # the aggregator's group too
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert any(not torch.equal(s, p) for s, p in zip(scaled.values(), plain.values()))  # the scale was there


def test_max_grad_norm_clips_the_model_with_its_prefix_not_the_aggregator(tmp_path):
    rows = make_rows(4, seed=13)
    free, unclipped = _trainer(tmp_path / "free", rows)
    free.train()
    clipped_trainer, clipped = _trainer(tmp_path / "clip", rows, max_grad_norm=1e-3)
    clipped_trainer.train()
    full, cut = _grads(unclipped), _grads(clipped)
    model_names = [n for n in full if not n.startswith("aggregator.")]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(full[n]) for n in model_names]))
    assert norm > 1e-2  # far above the limit: the clip acts
    for name in model_names:  # one factor for every model parameter, the prefix's included
        torch.testing.assert_close(cut[name], full[name] * (1e-3 / norm), rtol=1e-4, atol=1e-12)
    for name in full:
        if name.startswith("aggregator."):
            torch.testing.assert_close(cut[name], full[name], rtol=1e-6, atol=0)


def test_the_pdf_terms_are_logged_under_the_shared_metric_names(tmp_path):
    trainer, _ = _trainer(tmp_path, make_rows(4, seed=14))
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    from pdfkernels.models import objective

    assert {f"pdf/{n}" for n in (objective.LOSS_AGG, objective.LOSS_PATH, objective.MI_ESTIMATE,
                                 objective.LOSS_ESTIMATOR)} <= set(logged)
    assert vlm2vec.PDFObjective().temperature is None  # VLM2Vec's --temperature unless given
