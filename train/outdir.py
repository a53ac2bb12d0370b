"""One run per output folder: a folder holding an earlier run's outputs is refused unless the new run
continues it (``--resume``) or replaces it (``--overwrite``); ``run.json`` names the run that the
checkpoints belong to."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("pdf")

RUN_FILE = "run.json"
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


def prepare(config, rank: int) -> str:
    """Check (and with ``--overwrite`` clear, on rank 0) the output folder; returns this run's id."""
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"out_dir {out} is a file, expected a folder")
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
        return json.loads(record.read_text())["run"]
    run_id = uuid.uuid4().hex
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps({"run": run_id}))
        os.replace(tmp, record)
    return run_id
