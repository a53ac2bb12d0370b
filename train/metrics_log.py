"""``metrics.jsonl``: one strict-JSON line per step (NaN/inf written as ``null``), trimmed on resume so that
each step appears once."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("pdf")


def json_line(metrics: dict) -> str:
    """One line of strict JSON: a non-finite number becomes ``null`` (bare NaN is not JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return json.dumps(clean, allow_nan=False)


def trim(path: str | Path, last_step: int) -> None:
    """Keep the lines of steps ``<= last_step`` (a resumed run rewrites the later ones); drops a torn or
    undecodable line (counted in the log line)."""
    path = Path(path)
    if not path.exists():
        return
    kept, dropped = [], 0
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            keep = json.loads(line)["step"] <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False  # a line cut short by a kill, or bytes that are not UTF-8 (a damaged file)
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        log.info("%s: removed %d lines after step %d or unreadable (the resumed run writes the later steps "
                 "again)", path, dropped, last_step)


class MetricsLog:
    """Appends to ``path`` after trimming it to ``start`` steps."""

    def __init__(self, path: str | Path, start: int) -> None:
        trim(path, start)
        self.file = open(path, "a")

    def write(self, metrics: dict) -> None:
        self.file.write(json_line(metrics) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
