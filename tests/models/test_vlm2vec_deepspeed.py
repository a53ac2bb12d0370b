"""DeepSpeed inside VLM2Vec's trainer structure (``--deepspeed``, the Hugging Face Trainer's path): with ZeRO-2
two gloo processes take the same optimizer step as under DDP on the same batch (SGD: the update is the
gradient, so equal updates are equal gradients; the aggregator's too); ZeRO-3 is refused when the trainer is
built, saying why. DeepSpeed runs on its CPU accelerator; without deepspeed installed the module skips."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from pdfkernels.integrations import vlm2vec
from tests.models.test_vlm2vec_trainer import OBJECTIVE, _free_port
from tests.models.vlm2vec_trainer_doubles import (
    Collator,
    GradCacheTrainer,
    MMEBModel,
    ModelArgs,
    gloo_rank,
    make_rows,
    training_args,
)

pytest.importorskip("deepspeed")

BATCH = 4  # per rank; GradCache chunks of 2
LR = 1.0  # SGD: the update is lr * gradient (a large lr keeps the update far above the weights' rounding)


def _config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


def _weights(trainer) -> dict[str, torch.Tensor]:
    named = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    named.update({f"aggregator.{n}": p.detach().clone() for n, p in trainer.pdf_aggregator.named_parameters()})
    return named


class Metrics:
    """The PDF terms of every optimizer step (a TrainerCallback by duck typing)."""

    def __init__(self):
        self.trainer, self.steps = None, []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(dict(self.trainer.pdf_metrics))


def _worker(rank, world, port, folder, stage, steps=1, resume=None):
    with gloo_rank(rank, world, port):
        extra = {} if stage is None else {"deepspeed": _config(stage)}
        rows = make_rows(BATCH * world * steps, seed=1)
        rows = [r for i, r in enumerate(rows) if (i // BATCH) % world == rank]  # each rank its own rows per step
        out = os.path.join(folder, f"{stage}-{resume is not None}")
        args = training_args(out, ddp_backend="gloo", optim="sgd", learning_rate=LR, max_steps=steps,
                             save_strategy="steps" if steps > 1 else "no", save_steps=max(1, steps // 2), **extra)
        cls, model_args = vlm2vec.pdf_trainer(GradCacheTrainer, **OBJECTIVE), ModelArgs()
        try:
            metrics = Metrics()
            trainer = cls(model=MMEBModel.build(model_args), args=args, train_dataset=rows,
                          data_collator=Collator("right"), model_args=model_args, callbacks=[metrics])
            metrics.trainer = trainer
        except ValueError as error:
            torch.save({"refused": str(error)}, os.path.join(folder, f"{stage}-rank{rank}.pt"))
            return
        before = _weights(trainer)
        trainer.train(resume_from_checkpoint=None if resume is None else os.path.join(folder, resume))
        after = _weights(trainer)
        torch.save({"update": {n: after[n] - before[n] for n in before}, "metrics": trainer.pdf_metrics,
                    "steps": metrics.steps, "after": after, "wrapped": type(trainer.model_wrapped).__name__},
                   os.path.join(folder, f"{stage}-rank{rank}.pt"))


def _run(folder, stage, world=2, steps=1, resume=None):
    mp.start_processes(_worker, args=(world, _free_port(), str(folder), stage, steps, resume), nprocs=world,
                       start_method="fork")
    return [torch.load(folder / f"{stage}-rank{r}.pt", weights_only=False) for r in range(world)]


def test_zero2_takes_the_same_step_as_ddp_on_the_same_batch(tmp_path):
    ddp, zero2 = _run(tmp_path, None), _run(tmp_path, 2)
    assert ddp[0]["wrapped"] == "DistributedDataParallel" and zero2[0]["wrapped"] == "DeepSpeedEngine"
    want = ddp[0]["update"]
    for part in ("pdf_prefix", "lora_B", "aggregator"):
        assert any(part in n and u.abs().sum() > 0 for n, u in want.items()), f"no update reaches {part}"
    for rank in zero2:
        assert rank["metrics"]["loss"] == pytest.approx(ddp[0]["metrics"]["loss"], rel=1e-6)
        assert set(rank["update"]) == set(want)
        for name, update in want.items():
            torch.testing.assert_close(rank["update"][name], update, rtol=1e-4, atol=1e-6 * LR,
                                       msg=lambda m, k=name: f"{k}: {m}")


def test_zero3_is_refused_when_the_trainer_is_built(tmp_path):
    ranks = _run(tmp_path, 3, world=1)
    message = ranks[0]["refused"]
    assert "ZeRO-3 is not supported" in message and "no_sync" in message and "ZeRO-2" in message


def test_a_zero2_run_resumed_from_its_checkpoint_continues_as_the_straight_run(tmp_path):
    straight = _run(tmp_path, 2, steps=4)
    files = os.listdir(tmp_path / "2-False" / "checkpoint-2")
    assert {vlm2vec.PDF_FILE, vlm2vec.ESTIMATOR_OPTIMIZER_FILE, vlm2vec.AGGREGATOR_OPTIMIZER_FILE} <= set(files)
    resumed = _run(tmp_path, 2, steps=4, resume="2-False/checkpoint-2")
    for before, after in zip(straight, resumed):
        assert len(before["steps"]) == 4 and len(after["steps"]) == 2
        for want, got in zip(before["steps"][2:], after["steps"]):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
        for name, value in before["after"].items():
            torch.testing.assert_close(after["after"][name], value, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, k=name: f"{k}: {m}")
