"""The one list of shipped kernel configurations.

Launchers pick their launch parameters from here, and ``python -m pdfkernels.aot`` compiles every entry
for sm_80 and sm_90, so a configuration cannot ship without being compiled and inspected.
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


KERNEL_CONFIGS: list[KernelConfig] = []


def register(config: KernelConfig) -> KernelConfig:
    KERNEL_CONFIGS.append(config)
    return config


def configs_for(kernel: Any) -> list[KernelConfig]:
    return [c for c in KERNEL_CONFIGS if c.kernel is kernel]


def load_all() -> list[KernelConfig]:
    """Import every module that registers kernels, then return the full list."""
    from . import gaussian_mim, gaussian_pairwise  # noqa: F401  (register on import)

    return list(KERNEL_CONFIGS)
