"""Pick the fastest of a few registered kernel configurations per launch key, measured once on the GPU.

The registry (``pdfkernels.registry``) ships every configuration ahead of time, so the autotuner never invents
one: a launcher hands it a short list of registered candidates and a ``run`` callable that launches the kernel
with one candidate on the real arguments::

    cfg = autotune.pick("prefix_fwd", (arch, dtype, head_dim, causal, varlen, has_mask), candidates,
                        lambda c: launch(c, *args), q.device)
    launch(cfg, *args)  # the last timed run may have used another candidate: launch the choice afterwards

The first call for an ``(op, key)`` times every candidate with ``triton.testing.do_bench`` and caches the
fastest in-process; later calls return it without timing. The key must be hashable and hold everything that
can change the winner (architecture, dtype, head dim, flags, a shape bucket). Timing repeats the launch, which
is harmless only because the kernels overwrite their outputs (no atomics, no accumulation into outputs).

Tuning never runs inside ``torch.compile``'s tracing or a CUDA-graph capture (timing would sync, and a capture
would record the timing launches): there the cached choice is used, or ``candidates[0]`` when the key was never
tuned (not cached, so a later eager call still tunes). Warm up by running the op once eagerly on the shapes to be
captured (``torch.compile(mode="reduce-overhead")`` does: it runs eagerly before it captures).

Only CUDA devices outside Triton's interpreter are tuned; elsewhere ``candidates[0]`` is returned unrun, so
CPU runs and tests stay deterministic. ``PDFKERNELS_AUTOTUNE=0`` turns tuning off (``1`` or unset: on);
``PDFKERNELS_AUTOTUNE_LOG=1`` prints one line per new choice to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from . import backend, settings

WARMUP_MS = 5  # short: a launch key is tuned once per process, on the first real call
REP_MS = 20

T = TypeVar("T")

# timing function ``bench(fn) -> milliseconds``; None: triton.testing.do_bench, imported on first use so
# importing this module stays cheap. Tests replace it.
_bench: Callable[[Callable[[], None]], float] | None = None
_cache: dict[tuple[str, tuple], dict] = {}


def enabled(device: torch.device) -> bool:
    """True when launches on ``device`` are tuned: CUDA, compiled (not interpreted), not switched off."""
    return settings.on(settings.AUTOTUNE) and torch.device(device).type == "cuda" and not backend.interpreting()


def may_time(device: torch.device) -> bool:
    """False inside ``torch.compile``'s tracing or while a CUDA-graph capture is under way on this stream."""
    if torch.compiler.is_compiling():
        return False
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return not (on_cuda and torch.cuda.is_current_stream_capturing())


def _default_bench(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS))


def pick(op: str, key: tuple, candidates: Sequence[T], run: Callable[[T], None], device: torch.device) -> T:
    """The fastest candidate for ``(op, key)``, timed on first use; ``candidates[0]`` when tuning is off.

    A candidate whose run raises (e.g. Triton's out-of-resources at compile time) is skipped, so a list can
    hold configurations that fit only some GPUs. The candidate list for one ``(op, key)`` must not change
    between calls: the cache stores the winner's index.
    """
    if not candidates:
        raise ValueError(f"autotune {op} {key}: no candidates")
    if len(candidates) == 1 or not enabled(device):
        return candidates[0]
    cached = _cache.get((op, key))
    if cached is not None:
        return candidates[cached["choice"]]
    if not may_time(device):
        return candidates[0]

    global _bench
    if _bench is None:
        _bench = _default_bench
    times: list[float | None] = []
    errors: list[str] = []
    for i, candidate in enumerate(candidates):
        try:
            times.append(float(_bench(lambda c=candidate: run(c))))
        except Exception as e:  # any launch failure means: not this candidate
            times.append(None)
            errors.append(f"[{i}] {candidate!r}: {type(e).__name__}: {e}")
    ok = [i for i, t in enumerate(times) if t is not None]
    if not ok:
        raise RuntimeError(f"autotune {op} {key}: every candidate failed:\n  " + "\n  ".join(errors))
    choice = min(ok, key=lambda i: times[i])  # ties: the earlier (preferred) candidate
    _cache[(op, key)] = {"choice": choice, "times_ms": times}
    if settings.on(settings.AUTOTUNE_LOG):
        shown = ", ".join("failed" if t is None else f"{t:.4f}" for t in times)
        print(f"pdfkernels autotune: {op} {key} -> candidate {choice} (ms: {shown})", file=sys.stderr)
        for line in errors:
            print(f"pdfkernels autotune: {op} {key} skipped {line}", file=sys.stderr)
    return candidates[choice]


def chosen() -> dict[tuple[str, tuple], dict]:
    """A copy of the cache, ``(op, key) -> {"choice": index, "times_ms": [ms or None if it failed]}``, for
    reports and benchmarks."""
    return {k: {"choice": v["choice"], "times_ms": list(v["times_ms"])} for k, v in _cache.items()}


def clear() -> None:
    """Forget every choice, so the next call per key times again (tests, benchmarks that change the GPU)."""
    _cache.clear()
