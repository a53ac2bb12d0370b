"""One run per output folder: a folder holding an earlier run's outputs is refused unless the new run
continues it (``--resume``) or replaces it (``--overwrite``); ``run.json`` names the run that the
checkpoints belong to.

One trainer per folder at a time: the trainer (rank 0) holds an exclusive ``flock`` on ``LOCK_FILE`` from
before it reads or changes anything there until it ends. A second trainer, ``--resume`` or ``--overwrite``
included, is refused at once naming the holder's pid. The kernel drops the lock when its process ends,
however it ends, so a lock file left by a killed run is simply taken over."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("pdf")

RUN_FILE = "run.json"
LOCK_FILE = ".trainer.lock"  # not an output: never removed, its content names the holder
_HELD: dict[str, int] = {}  # folder (resolved) -> descriptor of the lock this process holds
# what a run writes; the generated default data set (data/) is not a run output and is reused
OUTPUTS = ("metrics.jsonl", "checkpoints", "pdf.safetensors", ".pdf.safetensors.tmp", "eval.json", "eval.md",
           RUN_FILE)


class OutDirError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to pass instead."""


def earlier_outputs(out: Path) -> list[str]:
    found = []
    for name in OUTPUTS:
        path = out / name
        if path.is_dir() and any(path.iterdir()) or path.is_file():
            found.append(name)
    return found


def lock(out: Path) -> None:
    """Hold the folder's lock for this process (kept while it is held already); ``OutDirError`` naming the
    holder when another process holds it."""
    key = str(out.resolve())
    if key in _HELD:
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not written its pid yet"
        os.close(fd)
        raise OutDirError(f"out_dir {out} is in use by another trainer ({holder}; lock {out / LOCK_FILE}): wait "
                          f"for it to end or stop it, or choose another --out-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _HELD[key] = fd


def release(out: str | Path) -> None:
    """Give up the folder's lock if this process holds it."""
    fd = _HELD.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def _run_id(record: Path) -> str:
    try:
        run_id = json.loads(record.read_text()).get("run")
    except (OSError, ValueError, AttributeError) as error:
        raise OutDirError(f"{record} is unreadable ({type(error).__name__}: {error}); it names the run the "
                          f"checkpoints belong to: restore it, or start again with --overwrite") from None
    if not isinstance(run_id, str) or not run_id:
        raise OutDirError(f"{record} names no run (expected {{\"run\": \"<id>\"}}); restore it, or start again "
                          f"with --overwrite")
    return run_id


def prepare(config, rank: int) -> str:
    """Lock (rank 0), check and with ``--overwrite`` clear the output folder; returns this run's id."""
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"out_dir {out} is a file, expected a folder")
    if rank == 0:
        lock(out)
    try:
        return _prepare_locked(config, rank, out)
    except BaseException:
        release(out)  # refused: the folder is free again for whoever comes next
        raise


def _prepare_locked(config, rank: int, out: Path) -> str:
    found = earlier_outputs(out) if out.exists() else []
    if found and not (config.resume or config.overwrite):
        raise OutDirError(f"out_dir {out} holds an earlier run ({', '.join(found)}): pass --resume to continue "
                          f"it, --overwrite to replace it, or choose another --out-dir")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 changes the folder
    if found and config.overwrite and rank == 0:
        log.warning("--overwrite: removing the earlier run's %s from %s", ", ".join(found), out)
        for name in found:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    record = out / RUN_FILE
    if config.resume and record.exists():
        return _run_id(record)
    run_id = uuid.uuid4().hex
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps({"run": run_id}))
        os.replace(tmp, record)
    return run_id
