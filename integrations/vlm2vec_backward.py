"""How the PDF step backpropagates inside a Hugging Face Trainer (VLM2Vec's), as the Trainer's own
``training_step`` would with the same flags:

- the loss divided by the gradient-accumulation steps (the Trainer's rule; VLM2Vec's GradCache step skips it);
- ``--fp16``: stage 2's loss scaled by the Trainer's GradScaler (``accelerator.scaler``), so the cached
  gradients, and through them every chunk's backward, carry the scale that the Trainer's clipping and
  optimizer step unscale (as VLM2Vec's GradCache does with ``scaler.scale(loss).backward()``);
- DDP: every chunk's re-forward and backward under ``no_sync`` except the step's last one (one reduction);
- DeepSpeed ZeRO-1/2: every chunk's backward through the engine (``engine.backward``; its loss scaling and
  gradient partitioning), the gradient-accumulation boundary only at the last chunk of a sync step, where the
  engine takes its step as accelerate's ``backward`` does. ZeRO-3 is refused (``check_deepspeed``).
"""

from __future__ import annotations

import contextlib

import torch

from pdfkernels.models.gradcache import Hooks, RandomState


def deepspeed_stage(trainer) -> int | None:
    """The ZeRO stage of the trainer's DeepSpeed config (None without DeepSpeed)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if stage is None:
        config = getattr(plugin, "deepspeed_config", None) or {}
        stage = config.get("zero_optimization", {}).get("stage", 0)
    return int(stage)


def check_deepspeed(trainer) -> None:
    """ZeRO-3 cannot run GradCache: refuse it when the trainer is built, saying why and what works."""
    if deepspeed_stage(trainer) == 3:
        raise ValueError("pdf_trainer: DeepSpeed ZeRO-3 is not supported: GradCache re-runs the forward chunk by "
                         "chunk and needs the gradient reduction held back until the last chunk (DDP's no_sync), "
                         "which ZeRO-3 does not have (its parameters are partitioned and gathered per forward). "
                         "Use ZeRO-2 or ZeRO-1 (\"zero_optimization\": {\"stage\": 2}) or DDP (no --deepspeed)")


def accumulation_steps(trainer) -> int:
    """The micro-batches of this optimizer step (the Trainer's count: fewer for an epoch's last step)."""
    return int(getattr(trainer, "current_gradient_accumulation_steps", None)
               or trainer.args.gradient_accumulation_steps)


def _sync_step(trainer) -> bool:
    """This micro-batch ends the accumulation (the Trainer tells accelerate so before ``training_step``)."""
    state = getattr(trainer.accelerator, "gradient_state", None)
    return bool(getattr(state, "sync_gradients", True))


def trainer_hooks(trainer, model: torch.nn.Module) -> Hooks:
    """The step's hooks for ``model`` (what the Trainer passes to ``training_step``: DDP, DeepSpeed engine or
    the bare module)."""
    device = trainer.args.device
    scale = 1.0 / accumulation_steps(trainer)
    scaler = getattr(trainer.accelerator, "scaler", None) if trainer.args.fp16 else None

    def loss_backward(loss: torch.Tensor) -> None:
        loss = loss * scale
        (scaler.scale(loss) if scaler is not None and deepspeed_stage(trainer) is None else loss).backward()

    if deepspeed_stage(trainer) is not None:
        engine, sync = model, _sync_step(trainer)

        def chunk_backward(surrogate: torch.Tensor, last: bool) -> None:
            engine.set_gradient_accumulation_boundary(is_boundary=last and sync)
            engine.backward(surrogate, scale_wrt_gas=False)  # already divided by the accumulation steps
            if last and sync:  # accelerate's backward under DeepSpeed steps here; the Trainer's step is a no-op
                lr = engine.optimizer.param_groups[0]["lr"]  # this step's (the engine's step moves the schedule)
                engine.step()
                if getattr(engine, "was_step_applied", lambda: True)():  # fp16: skipped on an overflow
                    trainer.pdf_step_aggregator(lr)

        return Hooks(random_state=lambda: RandomState(device), loss_backward=loss_backward,
                     chunk_backward=chunk_backward)

    no_sync = getattr(model, "no_sync", None)

    def chunk_context(last: bool):
        return no_sync() if no_sync is not None and not last else contextlib.nullcontext()

    return Hooks(random_state=lambda: RandomState(device), loss_backward=loss_backward,
                 chunk_context=chunk_context)
