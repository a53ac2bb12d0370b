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
from tests.models.test_vlm2vec_trainer import SETTINGS, _free_port
from tests.models.vlm2vec_trainer_doubles import (
    Collator,
    GradCacheTrainer,
    MMEBModel,
    ModelArgs,
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


def _worker(rank, world, port, folder, stage):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)  # a forked child must not inherit the parent's one-process state
    PartialState._reset_state()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = make_rows(BATCH * world, seed=1)[rank * BATCH:(rank + 1) * BATCH]
        extra = {} if stage is None else {"deepspeed": _config(stage)}
        args = training_args(os.path.join(folder, str(stage)), ddp_backend="gloo", optim="sgd", learning_rate=LR,
                             **extra)
        cls, model_args = vlm2vec.pdf_trainer(GradCacheTrainer, **SETTINGS), ModelArgs()
        try:
            trainer = cls(model=MMEBModel.build(model_args), args=args, train_dataset=rows,
                          data_collator=Collator("right"), model_args=model_args)
        except ValueError as error:
            torch.save({"refused": str(error)}, os.path.join(folder, f"{stage}-rank{rank}.pt"))
            return
        before = _weights(trainer)
        trainer.train()
        after = _weights(trainer)
        torch.save({"update": {n: after[n] - before[n] for n in before}, "metrics": trainer.pdf_metrics,
                    "wrapped": type(trainer.model_wrapped).__name__}, os.path.join(folder, f"{stage}-rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _run(folder, stage, world=2):
    mp.start_processes(_worker, args=(world, _free_port(), str(folder), stage), nprocs=world, start_method="fork")
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
