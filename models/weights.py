"""Save and load the PDF weights (prefix, aggregator, estimator) with N, K and the model type, in one
safetensors file."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .anatomy import geometry, hf_model


def _describe(model: nn.Module) -> dict:
    hf = hf_model(model)
    layers, kv_heads, head_dim = geometry(hf)
    return {"model_type": type(hf).__name__, "num_paths": hf.pdf_num_paths, "prefix_len": hf.pdf_prefix_len,
            "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim}


def save_pdf(path: str | os.PathLike, model: nn.Module, aggregator: nn.Module | None = None,
             estimator: nn.Module | None = None) -> None:
    """Write ``prefix`` and the aggregator's/estimator's weights to ``path`` atomically (temporary file, rename)."""
    hf = hf_model(model)
    tensors = {"prefix": hf.pdf_prefix.detach().contiguous().cpu()}
    for name, module in (("aggregator", aggregator), ("estimator", estimator)):
        if module is not None:
            tensors.update({f"{name}.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
    meta = {"pdf": json.dumps(_describe(model))}
    # a fixed temporary name beside the file: one left by a kill is replaced by the next save, never piles up
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _same_kind(file: torch.Tensor, own: torch.Tensor) -> bool:
    """A floating tensor may load into another floating dtype (fp32 master into bf16); anything else must
    match exactly (``copy_`` would cast an int tensor silently)."""
    return file.dtype == own.dtype or (file.dtype.is_floating_point and own.dtype.is_floating_point)


def _check_fits(path, name: str, module: nn.Module, state: dict) -> None:
    if not state:
        raise ValueError(f"load_pdf: {path} holds no {name} weights")
    own = module.state_dict()
    wrong = sorted(k for k in own.keys() | state.keys()
                   if k not in own or k not in state or tuple(own[k].shape) != tuple(state[k].shape)
                   or not _same_kind(state[k], own[k]))
    if wrong:
        details = ", ".join(f"{k}: file {_spec(state.get(k))}, module {_spec(own.get(k))}" for k in wrong)
        raise ValueError(f"load_pdf: the {name} weights in {path} do not fit the given {name} ({details})")


def _spec(t: torch.Tensor | None) -> str:
    return "missing" if t is None else f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _check_prefix(path, tensors: dict, prefix: torch.Tensor) -> None:
    """The stored prefix exists and has the model's exact shape (``copy_`` would broadcast one of another
    shape: one path's prefix into every path) and a floating dtype."""
    stored = tensors.get("prefix")
    if stored is None or tuple(stored.shape) != tuple(prefix.shape) or not _same_kind(stored, prefix):
        raise ValueError(f"load_pdf: the prefix in {path} does not fit this model (file {_spec(stored)}, model "
                         f"{_spec(prefix)})")


def load_pdf(path: str | os.PathLike, model: nn.Module, aggregator: nn.Module | None = None,
             estimator: nn.Module | None = None) -> dict:
    """Load what ``save_pdf`` wrote into a patched model (and the given modules); returns the stored description.
    A model of another type or shape (N, K, layers, KV heads, head_dim), or an aggregator/estimator whose weights
    differ in name, shape or dtype kind, or a prefix tensor that is missing or of another shape or dtype, is
    refused with a clear error before anything is loaded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("pdf", "{}"))
    if not stored:
        raise ValueError(f"load_pdf: {path} holds no PDF description (not written by save_pdf)")
    expected = _describe(model)
    mismatched = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: file {a!r}, model {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"load_pdf: {path} does not fit this model ({details})")
    tensors = load_file(str(path))
    _check_prefix(path, tensors, hf_model(model).pdf_prefix)
    states = {}
    for name, module in (("aggregator", aggregator), ("estimator", estimator)):
        if module is not None:
            states[name] = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            _check_fits(path, name, module, states[name])
    # everything fits: only now is anything overwritten (never a half-loaded model)
    hf = hf_model(model)
    with torch.no_grad():
        hf.pdf_prefix.copy_(tensors["prefix"].to(hf.pdf_prefix.dtype))
    for name, state in states.items():
        (aggregator if name == "aggregator" else estimator).load_state_dict(state)
    return stored
