"""Every environment variable pdfkernels reads, in one table with one parser.

    python -m pdfkernels.selfcheck --env   # each variable, its value here and what it does

A value is looked up at each use (one dict lookup: tests and scripts switch them within a process) and parsed
once per distinct value. ``TRITON_INTERPRET`` is Triton's own: it is read as Triton reads it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str
    default: str
    choices: tuple[str, ...] | None  # None: any text (a seed)
    meaning: str
    fold_case: bool = False  # "Auto" is "auto"


BACKEND = Knob("PDFKERNELS_BACKEND", "auto", ("auto", "triton", "torch"),
               "auto: Triton kernels on CUDA tensors, the PyTorch path on CPU ones; triton or torch: that one "
               "everywhere (triton on a CPU needs TRITON_INTERPRET=1)", fold_case=True)
TMA = Knob("PDFKERNELS_TMA", "auto", ("auto", "0", "1"),
           "auto: tensor descriptors for the sm_90 16-bit padded kernels where the tensors allow; 0: pointer loads "
           "everywhere; 1: descriptors wherever the tensors allow, under the interpreter too", fold_case=True)
AUTOTUNE = Knob("PDFKERNELS_AUTOTUNE", "1", ("0", "1"),
                "1: time the registered candidates once per launch key on a GPU; 0: take the default")
AUTOTUNE_LOG = Knob("PDFKERNELS_AUTOTUNE_LOG", "0", ("0", "1"), "1: print each autotune choice to stderr")
POISON = Knob("PDFKERNELS_POISON", "0", ("0", "1"),
              "1 (the tests set it): kernel outputs start as NaN, so an element a kernel never writes fails")
BENCH_QUICK = Knob("PDFKERNELS_BENCH_QUICK", "0", ("0", "1"),
                   "1: CI-sized benchmark cases (python -m pdfkernels.bench --quick sets it)")
TEST_SEED = Knob("PDFKERNELS_TEST_SEED", "", None, "the tests' random seed (a failing run prints it; unset: fresh)")
KNOBS = (BACKEND, TMA, AUTOTUNE, AUTOTUNE_LOG, POISON, BENCH_QUICK, TEST_SEED)


@functools.cache
def _parse(knob: Knob, raw: str | None) -> str:
    value = (raw if raw is not None else knob.default).strip()
    value = (value.lower() if knob.fold_case else value) or knob.default
    if knob.choices is not None and value not in knob.choices:
        raise ValueError(f"environment variable {knob.name} expected one of {knob.choices}, got {value!r}")
    return value


def get(knob: Knob) -> str:
    """``knob``'s value: the variable's (stripped) or its default; a value outside its choices raises."""
    return _parse(knob, os.environ.get(knob.name))


def on(knob: Knob) -> bool:
    """A 0/1 switch is "1"."""
    return get(knob) == "1"


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, read as Triton reads ``TRITON_INTERPRET`` (its knob takes
    "true", "on", "yes" too); a Triton without knobs (before 3.4) compared the variable with "1"."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def table() -> list[tuple[str, str, str, str]]:
    """(variable, value here, default and choices, meaning) for every variable, ``TRITON_INTERPRET`` last."""
    rows = []
    for knob in KNOBS:
        raw = os.environ.get(knob.name)
        allowed = "/".join(knob.choices) if knob.choices else "any"
        rows.append((knob.name, "(unset)" if raw is None else raw, f"{knob.default or '(unset)'} ({allowed})",
                     knob.meaning))
    raw = os.environ.get("TRITON_INTERPRET")
    rows.append(("TRITON_INTERPRET", "(unset)" if raw is None else raw, "0 (as Triton reads it)",
                 f"Triton's: run kernels on the CPU in its interpreter (here: {'on' if interpreting() else 'off'})"))
    return rows
