"""Training checkpoints that are never lost: written to a temporary file and renamed, verified on load, the
last k of this run kept, and everything needed to continue exactly (weights, both optimizers, scheduler, RNG
states, the step).

Beside each ``step_N.pt`` a ``step_N.pt.json`` records its size, SHA-256 and the run it belongs to. Loading
checks them, and always (a checkpoint copied without its record too) the CRC-32 that the zip container
stores for every member, which ``torch.load`` itself never checks. A damaged checkpoint (truncated, empty,
flipped bytes, unreadable) is set aside as ``step_N.pt.damaged`` with a warning naming it, and the previous
intact one is used. Checkpoints load with ``weights_only=True``: a crafted file cannot run code (its pickle
may only build tensors and plain containers); one that needs more is refused as unreadable.
Pruning only ever removes this run's older checkpoints, and a checkpoint is never written over a later one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import zipfile
from pathlib import Path

import torch

log = logging.getLogger("pdf")
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or no intact one can be read; the message names the file."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def step_of(path: str | Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def checksum_file(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record(path: Path) -> dict:
    try:
        return json.loads(checksum_file(path).read_text())
    except (OSError, ValueError):
        return {}


def save(folder: str | Path, step: int, parts, config, keep: int, run_id: str = "") -> Path:
    """Write the state after ``step`` steps; keep this run's last ``keep`` checkpoints (0: all)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    later = [p for p in checkpoints(folder) if step_of(p) > step]
    if later:
        raise CheckpointError(f"refusing to write step {step} into {folder}: it holds the later checkpoint "
                              f"{later[-1].name}, which is never overwritten")
    state = {
        "step": step,
        "run": run_id,
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
    for stale in folder.glob(".step_*.tmp"):  # left by a killed run (one process writes checkpoints)
        stale.unlink(missing_ok=True)
    path = folder / f"step_{step:07d}.pt"
    tmp = folder / f".step_{step:07d}.pt.tmp"
    record_tmp = folder / f".step_{step:07d}.pt.json.tmp"
    try:
        with open(tmp, "wb") as f, _crc32_on():
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        record = {"step": step, "run": run_id, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        record_tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoints intact
        os.replace(record_tmp, checksum_file(path))
    except BaseException as error:  # a failed write, or a signal: no partial file stays behind
        tmp.unlink(missing_ok=True)
        record_tmp.unlink(missing_ok=True)
        if not isinstance(error, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            raise
        if _disk_full(error):
            raise CheckpointError(f"no space left on device while writing checkpoint {path}: the partial file "
                                  f"was removed and earlier checkpoints are intact; free space, then --resume"
                                  ) from error
        raise CheckpointError(f"cannot write checkpoint {path}: {error}") from error
    _prune(folder, keep, run_id)
    return path


@contextlib.contextmanager
def _crc32_on():
    """torch.save with the zip CRC-32s computed (``load_latest_intact`` checks them) even where the user's
    code turned them off (``torch.serialization.set_crc32_options(False)``, for speed)."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    previous = get() if get is not None else True
    if not previous:
        torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        if not previous:
            torch.serialization.set_crc32_options(False)


def _disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (torch.save wraps the OSError of the write that failed)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def _prune(folder: Path, keep: int, run_id: str) -> None:
    """Remove this run's checkpoints beyond the last ``keep``; another run's files are never touched."""
    if keep <= 0:
        return
    mine = [p for p in checkpoints(folder) if _record(p).get("run") == run_id]
    for old in mine[:-keep]:
        old.unlink()
        checksum_file(old).unlink(missing_ok=True)


def checkpoints(folder: str | Path) -> list[Path]:
    """``step_*.pt`` files, by step."""
    folder = Path(folder)
    found = [p for p in folder.glob("step_*.pt") if _NAME.match(p.name)] if folder.exists() else []
    return sorted(found, key=step_of)


def latest(folder: str | Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def _zip_damage(path: Path) -> str | None:
    """Why the zip container of ``path`` is damaged (a member's CRC-32 or the directory), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and compares its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"not a readable zip container ({type(error).__name__}: {error})"
    return f"member {bad} fails its CRC-32 check" if bad else None


def damage(path: Path) -> str | None:
    """Why ``path`` is not the file its checksum record describes or its zip's CRC-32s say, or None."""
    record = _record(path)
    if record:
        size = path.stat().st_size
        if size != record.get("bytes"):
            return f"{size} bytes, {record.get('bytes')} recorded"
        if file_sha256(path) != record.get("sha256"):
            return "SHA-256 differs from the recorded one"
    return _zip_damage(path)


def read(path: str | Path) -> dict:
    """A checkpoint's state, unpickled with ``weights_only=True`` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest_intact(folder: str | Path, set_aside: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies and loads, with its state; None when the folder holds none.

    Damaged ones are skipped with a warning naming them and (``set_aside``, one process only) renamed to
    ``*.damaged`` so that they are neither loaded again nor overwritten. Raises when every one is damaged."""
    damaged = []
    for path in reversed(checkpoints(folder)):
        try:
            problem = damage(path)
            if not checksum_file(path).exists():
                log.warning("checkpoint %s has no checksum record %s: verified by its zip CRC-32s only", path,
                            checksum_file(path).name)
            state = None if problem else read(path)
        except Exception as error:  # a truncated zip, an empty file, a file removed meanwhile
            problem, state = f"cannot be read: {type(error).__name__}: {error}", None
        if state is not None and not (isinstance(state, dict) and {"step", "model"} <= set(state)):
            problem = "not a training checkpoint (no step/model entries)"
        if problem is None:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path, state
        damaged.append(f"{path.name} ({problem})")
        log.warning("checkpoint %s is damaged (%s): falling back to the previous one", path, problem)
        if set_aside:
            path.replace(path.with_name(path.name + ".damaged"))
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {folder}: {'; '.join(damaged)}. Start again with "
                              f"--overwrite, or restore a copy")
    return None


def restore(path: str | Path, parts, state: dict | None = None) -> int:
    """Load a checkpoint (or its already loaded ``state``) into ``parts``; returns the step it was written after."""
    if state is None:
        state = read(path)
    params = dict(parts.model.named_parameters())
    missing = [n for n in state["model"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} does not fit this model: unknown parameters {missing[:3]}")
    wrong = [n for n, v in state["model"].items() if v.shape != params[n].shape]
    if wrong:
        raise ValueError(f"checkpoint {path} does not fit this model: parameter {wrong[0]} has shape "
                         f"{tuple(state['model'][wrong[0]].shape)}, the model {tuple(params[wrong[0]].shape)}")
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    if parts.aggregator is not None:
        parts.aggregator.load_state_dict(state["aggregator"])
    if parts.estimator is not None and state.get("estimator") is None:  # --track-mi added on resume
        log.warning("checkpoint %s holds no vCLUB estimator (it trained none): the estimator starts fresh", path)
    elif parts.estimator is not None:
        parts.estimator.load_state_dict(state["estimator"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.estimator_optimizer is not None and state.get("estimator_optimizer") is not None:
        parts.estimator_optimizer.load_state_dict(state["estimator_optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]
