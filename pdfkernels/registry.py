"""The one list of shipped kernel configurations.

Each op module registers its own configurations on import (this module imports none of them); launchers find
theirs with ``lookup(kernel, key)``, and ``python -m pdfkernels.aot`` compiles every entry for sm_80 and sm_90,
so a configuration cannot ship without being compiled and inspected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant of a kernel: argument types, constexpr values and launch parameters."""

    kernel: Any  # a triton JITFunction
    variant: str  # short label for reports, e.g. "fp32" or "bf16 D=128"
    signature: dict[str, str]  # argument name -> Triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    expect_wgmma: bool = False  # sm_90 code must use wgmma (tensor-core dots on 16-bit inputs)
    # integer arguments the launcher guarantees to be multiples of 16 (Triton specialises on this at run
    # time, so the ahead-of-time compile must assume it too to see the same code)
    multiple_of_16: tuple[str, ...] = ()
    arch: int | None = None  # the compute capability this config is tuned for (80, 90); None: every arch
    # static-profile budgets: loop name (``# loop: NAME`` in the kernel source) -> most issue clocks per
    # 64x64x16 MMA unit on sm_90 (``python -m pdfkernels.aot --profile``)
    budgets: dict[str, float] = field(default_factory=dict)
    # what a launcher looks candidates up by (e.g. dtype, head_dim, arch, TMA): the configs sharing one key
    # are the alternatives the autotuner times on a GPU, the first registered being the default
    key: tuple = ()

    @property
    def name(self) -> str:
        arch = "" if self.arch is None else f" sm_{self.arch}"
        return f"{self.kernel.fn.__name__}[{self.variant}{arch}]"


KERNEL_CONFIGS: list[KernelConfig] = []  # every op module appends its own on import
_BY_KEY: dict[tuple[Any, tuple], list[KernelConfig]] = {}


def register(config: KernelConfig) -> KernelConfig:
    KERNEL_CONFIGS.append(config)
    _BY_KEY.setdefault((config.kernel, config.key), []).append(config)
    return config


def configs_for(kernel: Any) -> list[KernelConfig]:
    return [c for c in KERNEL_CONFIGS if c.kernel is kernel]


def lookup(kernel: Any, key: tuple) -> tuple[KernelConfig, ...]:
    """The configurations of ``kernel`` registered under ``key``, the default (first registered) first: how every
    launcher finds its launch parameters."""
    found = _BY_KEY.get((kernel, key))
    if not found:
        raise LookupError(f"no registered configuration of {kernel.fn.__name__} for key {key}")
    return tuple(found)
