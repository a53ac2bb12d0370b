"""Training checkpoints that are never lost: written to a temporary file and renamed, the last k kept, and
everything needed to continue exactly (weights, both optimizers, scheduler, RNG states, the step)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import torch

_NAME = re.compile(r"step_(\d+)\.pt$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(folder: str | Path, step: int, parts, config, keep: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": trainable_state(parts.model),
        "aggregator": parts.aggregator.state_dict() if parts.aggregator is not None else None,
        "estimator": parts.estimator.state_dict() if parts.estimator is not None else None,
        "optimizer": parts.optimizer.state_dict(),
        "estimator_optimizer": parts.estimator_optimizer.state_dict() if parts.estimator_optimizer else None,
        "scheduler": parts.scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "config": vars(config),
    }
    path = folder / f"step_{step:07d}.pt"
    tmp = folder / f".step_{step:07d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoints intact
    for old in sorted(checkpoints(folder))[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.glob("step_*.pt") if _NAME.search(p.name)) if folder.exists() else []


def latest(folder: str | Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def restore(path: str | Path, parts) -> int:
    """Load a checkpoint into ``parts``; returns the step it was written after."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(parts.model.named_parameters())
    missing = [n for n in state["model"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} does not fit this model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    if parts.aggregator is not None:
        parts.aggregator.load_state_dict(state["aggregator"])
    if parts.estimator is not None:
        parts.estimator.load_state_dict(state["estimator"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.estimator_optimizer is not None:
        parts.estimator_optimizer.load_state_dict(state["estimator_optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]
