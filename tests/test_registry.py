"""One lookup by key for every op's launch, and a registry that imports none of the modules that register."""

import ast
from pathlib import Path

import pytest
import torch

from pdfkernels import gaussian_mim, gaussian_pairwise, prefix_attention_tiles, registry
from pdfkernels.prefix_attention_kernels import prefix_attention_fwd_kernel


def test_registry_imports_no_op_module():
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "typing"}, imported


def test_each_launch_finds_its_configuration_by_key():
    for t in ("fp32", "fp16", "bf16"):
        assert registry.lookup(gaussian_pairwise.gaussian_pairwise_kernel, (t,))[0].variant == t
        assert registry.lookup(gaussian_mim.mim_stats_kernel, (t,))[0].variant == t
        for use_stats, label in ((True, "mim"), (False, "estimator")):
            for kernel in (gaussian_mim.mim_forward_kernel, gaussian_mim.mim_backward_kernel):
                assert registry.lookup(kernel, (t, use_stats))[0].variant == f"{t} {label}"
    (cfg, *_) = prefix_attention_tiles.candidates(prefix_attention_fwd_kernel, torch.bfloat16, 72, 90, False)
    assert cfg.key == ("bf16", 80, 90) and not cfg.constexprs["TMA"]


def test_an_unregistered_key_is_refused_by_name():
    with pytest.raises(LookupError, match="gaussian_pairwise_kernel for key \\('fp64',\\)"):
        registry.lookup(gaussian_pairwise.gaussian_pairwise_kernel, ("fp64",))
