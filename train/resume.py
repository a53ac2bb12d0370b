"""``--resume``: continue from the newest intact checkpoint, with the new run's config compared against the
checkpoint's.

- Settings that change what is trained (model, shapes, paths, the data, the batch, the seed) must be equal:
  a change is refused, naming each field.
- Settings that can change mid-run are applied and each change is logged: lr, estimator_lr and weight_decay
  go into the restored optimizers (the schedule keeps its position), steps/warmup_steps reshape the rest of
  the schedule, and everything read afresh every step (temperature, lambdas, clipping, chunking, logging,
  evaluation) simply takes the new value.
- ``--steps`` below the checkpoint's step is refused: a run never goes back over a later checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pdfkernels.models.objective import uses_mim

from . import checkpoint

log = logging.getLogger("pdf")

# fields whose change makes the checkpoint another training run (or another set of parameters)
# (the Table 3 switches set num_paths, prefix_len and lambda_mim: covered by these and the MIM check below)
FIXED = ("model", "lora_r", "num_paths", "prefix_len", "train_data", "subset_weights", "image_dir", "global_batch",
         "max_length", "seed", "hard_negatives", "image_resolution", "num_frames", "video_fps")
# flags about this invocation only, never compared
TRANSIENT = ("resume", "overwrite", "stop_after")


class ResumeError(ValueError):
    """The checkpoint cannot continue under the given config; the message names the fields."""


def _uses_mim(values: dict) -> bool:
    return uses_mim(values.get("num_paths", 1), values.get("lambda_mim", 0))


def compare(saved: dict, config, path: Path) -> list[str]:
    """Raise on a change that cannot be resumed; return a description of each change that is applied."""
    current = vars(config)
    fixed = [f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in FIXED
             if k in saved and k in current and saved[k] != current[k]]
    if _uses_mim(saved) != _uses_mim(current):
        fixed.append(f"MIM (num_paths > 1 and lambda_mim > 0): checkpoint {_uses_mim(saved)}, now "
                     f"{_uses_mim(current)}")
    if fixed:
        raise ResumeError(f"--resume: {path} was trained with another config whose fields cannot change mid-run ("
                          f"{'; '.join(fixed)}); use the checkpoint's values or another --out-dir")
    return [f"{k} {saved[k]!r} -> {current[k]!r}" for k in current
            if k in saved and k not in FIXED + TRANSIENT and saved[k] != current[k]]


def apply_optimisation_fields(parts, config) -> None:
    """Put lr, estimator_lr and weight_decay of ``config`` into the restored optimizers, at the schedule's step."""
    scheduler = parts.scheduler
    for i, group in enumerate(parts.optimizer.param_groups):
        group["weight_decay"] = config.weight_decay
        group["initial_lr"] = scheduler.base_lrs[i] = config.lr
        group["lr"] = config.lr * scheduler.lr_lambdas[i](scheduler.last_epoch)  # as LambdaLR computes it
    if parts.estimator_optimizer is not None:
        for group in parts.estimator_optimizer.param_groups:
            group["lr"] = config.estimator_lr


def resume(folder: str | Path, parts, config, rank: int = 0) -> int:
    """Restore the newest intact checkpoint in ``folder`` into ``parts``; returns its step (0 when none)."""
    found = checkpoint.load_latest_intact(folder, set_aside=rank == 0)
    if found is None:
        log.warning("--resume: no checkpoint in %s; starting at step 0", folder)
        return 0
    path, state = found
    changes = compare(state.get("config", {}), config, path)
    if config.steps < state["step"]:
        raise ResumeError(f"--resume: --steps {config.steps} is below the step of {path} ({state['step']}); a run "
                          f"never goes back over a later checkpoint: pass --steps >= {state['step']}")
    step = checkpoint.restore(path, parts, state)
    apply_optimisation_fields(parts, config)
    for change in changes:
        log.warning("--resume: %s (applied from step %d)", change, step + 1)
    log.info("resumed from %s at step %d", path, step)
    return step
