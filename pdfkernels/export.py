"""Export a PDF-trained model as a standard Hugging Face model folder plus one path's prefix.

    python -m pdfkernels.export CHECKPOINT OUT [--path P] [--base DIR] [--overwrite] [--no-verify]

``CHECKPOINT``: our trainer's output folder (``--out-dir``: its newest intact ``checkpoints/step_*.pt``), its
``checkpoints/`` folder or one ``step_*.pt``; or a VLM2Vec checkpoint folder (``checkpoint-N/`` or the final
output: ``pdf.safetensors`` beside peft adapters, whose base model is ``--base`` or the adapters'
``base_model_name_or_path``, or beside a full model). ``OUT`` gets:

- the backbone with LoRA/DoRA merged (``config.json``, ``model.safetensors``), its tokenizer and image processor;
- ``pdf_prefix.safetensors``: ``keys`` and ``values`` ``[layers, kv_heads, K, head_dim]`` of path P (fp32);
- ``pdf_export.json``: the format (``pdfkernels-prefix-cache`` version 1) and the numbers above;
- ``stock_loader.py``: the loader that needs only torch and transformers (``pdfkernels/stock_loader.py``).

Written into ``OUT.partial`` and renamed at the end, so that ``OUT`` is complete or absent. Unless
``--no-verify``, the export is checked before it is renamed: the stock loader's embedding of a small text batch
must equal ``models.encode(model, inputs, paths=P)`` within 1e-4 (fp32).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from pdfkernels import stock_loader
from pdfkernels.models.families import FAMILIES, load_local

log = logging.getLogger("pdf.export")
PREFIX_FILE = "pdf_prefix.safetensors"
VLM2VEC_PDF_FILE = "pdf.safetensors"  # integrations/vlm2vec.py's PDF_FILE (not imported: it needs no trainer)
VERIFY_TOLERANCE = 1e-4
# stock transformers classes the exported folder loads into (Phi-3-V exists only as remote code: refused)
EXPORTABLE = tuple(f.stock_class for f in FAMILIES.values() if f.stock_class)
# VLM2Vec's vendored layouts (the pre-4.52 Hugging Face names) -> the stock classes' module names, for adapter keys
LEGACY_NAMES = ((re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
                (re.compile(r"^visual\."), "model.visual."),
                (re.compile(r"^language_model\.model\."), "model.language_model."))


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message names the argument and what was expected."""


def export(model: nn.Module, out: str | Path, path: int = 0, tokenizer=None, processor=None,
           source: str = "", verify: bool = True, overwrite: bool = False) -> Path:
    """Write ``model`` (patched by ``models.apply_pdf``, bare or inside peft or VLM2Vec's ``MMEBModel``; its
    LoRA/DoRA adapters are merged into it in place) as an export folder ``out`` for prefix path ``path``."""
    from pdfkernels.models.anatomy import geometry, hf_model

    hf = hf_model(model)
    if not hasattr(hf, "pdf_prefix"):
        raise ExportError("export: argument 'model' expected a model patched by models.apply_pdf, got an "
                          f"unpatched {type(hf).__name__}")
    architecture = type(hf).__name__
    if architecture not in EXPORTABLE or getattr(transformers, architecture, None) is None:
        raise ExportError(f"export: {architecture} cannot be exported: stock transformers "
                          f"{transformers.__version__} loads only {', '.join(EXPORTABLE)} (Phi-3-V has no "
                          "transformers class, only its own remote code)")
    num_paths = hf.pdf_num_paths
    if isinstance(path, bool) or not isinstance(path, int) or not 0 <= path < num_paths:
        raise ExportError(f"export: argument 'path' expected an int in [0, {num_paths}), got {path!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"export: OUT {out} exists and is not empty; choose another folder or pass --overwrite")
    if hasattr(model, "merge_and_unload") or hasattr(getattr(model, "encoder", None), "merge_and_unload"):
        owner = model if hasattr(model, "merge_and_unload") else model.encoder
        merged = owner.merge_and_unload()
        if owner is model:
            model = merged
        else:
            model.encoder = merged
        hf = hf_model(model)
    hf.eval()
    layers, kv_heads, head_dim = geometry(hf)
    prefix = hf.pdf_prefix.detach().float().cpu()[:, path]  # [layers, 2, Hkv, K, D]
    described = {"format": stock_loader.FORMAT, "version": stock_loader.VERSION, "architecture": architecture,
                 "prefix_file": PREFIX_FILE, "path": path, "num_paths": num_paths, "prefix_len": hf.pdf_prefix_len,
                 "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "pooling": "last_token",
                 "loader": "stock_loader.py", "source": source, "transformers": transformers.__version__}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {k: v for k, v in hf.state_dict().items() if k != "pdf_prefix"}
    hf.save_pretrained(partial, state_dict=state, safe_serialization=True)
    for part in (tokenizer, processor):
        if part is not None:
            part.save_pretrained(partial)
    save_file({"keys": prefix[:, 0].contiguous(), "values": prefix[:, 1].contiguous()}, str(partial / PREFIX_FILE),
              metadata={k: str(v) for k, v in described.items()})
    (partial / stock_loader.EXPORT_FILE).write_text(json.dumps(described, indent=1) + "\n")
    shutil.copyfile(stock_loader.__file__, partial / "stock_loader.py")
    if verify:  # recorded in the JSON: what the stock loader was checked against, and how closely
        described["verified_max_difference"] = verify_export(model, partial, path)
        (partial / stock_loader.EXPORT_FILE).write_text(json.dumps(described, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def verify_export(model: nn.Module, folder: Path, path: int) -> float:
    """The stock loader's embedding of a small text batch (left padded) against ``models.encode``; raises when
    they differ by more than ``VERIFY_TOLERANCE``."""
    from pdfkernels import models
    from pdfkernels.models.anatomy import hf_model, inner_model

    hf = hf_model(model)
    vocab = hf.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab // 2, vocab, (2, 6), generator=generator)  # high ids: no special token
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    forward = (inner_model(model) or hf).forward
    if "mm_token_type_ids" in inspect.signature(forward).parameters:
        inputs["mm_token_type_ids"] = torch.zeros_like(ids)
    device = hf.get_input_embeddings().weight.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        expected = models.encode(model, inputs, paths=path)[0].float()
    embedder = stock_loader.load(folder, device=device)
    got = embedder.embed(inputs).float()
    difference = float((got - expected).abs().max())
    if not difference <= VERIFY_TOLERANCE:
        raise ExportError(f"export: the exported model's embedding differs from models.encode by {difference:.3e} "
                          f"(> {VERIFY_TOLERANCE}); the export in {folder} is left for inspection")
    return difference


# --- reading checkpoints -------------------------------------------------------------------------------------------

def _trainer_checkpoint(source: Path) -> Path | None:
    """The step file our trainer's ``source`` (output folder, its ``checkpoints/`` or a step file) points at."""
    from pdfkernels.train import checkpoint

    if source.is_file() and checkpoint._NAME.match(source.name):
        return source
    for folder in (source / "checkpoints", source):
        if checkpoint.checkpoints(folder):
            return folder
    return None


def from_trainer(source: Path, device: torch.device):
    """(patched model, tokenizer, processor) rebuilt from our trainer's checkpoint: the architecture and tokenizer
    as ``train.model.build`` makes them from the checkpoint's config, then its trained weights."""
    from pdfkernels.train import checkpoint, synthetic
    from pdfkernels.train.model import build

    found = _trainer_checkpoint(source)
    if found.is_file():
        step_file, state = found, checkpoint.read(found)
    else:
        step_file, state = checkpoint.load_latest_intact(found, set_aside=False)
    saved = state["config"]
    config = SimpleNamespace(model=saved["model"], lora_r=saved["lora_r"], num_paths=saved["num_paths"],
                             prefix_len=saved["prefix_len"], seed=saved["seed"], dtype="fp32",
                             gradient_checkpointing=False)
    model, tokenizer, processor = build(config, synthetic.all_words(), device)
    params = dict(model.named_parameters())
    unknown = [n for n in state["model"] if n not in params]
    wrong = [n for n, v in state["model"].items() if n in params and v.shape != params[n].shape]
    if unknown or wrong:
        raise ExportError(f"export: {step_file} does not fit the model its config builds (unknown parameters "
                          f"{unknown[:3]}, other shapes {wrong[:3]})")
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    log.info("export: read %s (step %d, model %s)", step_file, state["step"], saved["model"])
    return model, tokenizer, processor, f"{step_file} (step {state['step']})"


def _is_vlm2vec(source: Path) -> bool:
    return source.is_dir() and (source / VLM2VEC_PDF_FILE).is_file() and (
        (source / "adapter_config.json").is_file() or (source / "config.json").is_file())


def _load_backbone(folder: Path):
    return load_local(str(folder), torch.float32, f"model directory {folder}")


def _load_adapters(model: nn.Module, folder: Path) -> nn.Module:
    """``model`` with the peft adapters of ``folder`` loaded, their keys mapped from VLM2Vec's vendored layout
    where needed; every stored tensor must land and every adapter tensor be stored, else refused."""
    import peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config = peft.PeftConfig.from_pretrained(str(folder))
    wrapped = peft.get_peft_model(model, config)
    wanted = set(get_peft_model_state_dict(wrapped))
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(f"export: {folder} has adapter_config.json but no adapter_model.safetensors")
    mapped = {}
    for key, value in load_file(str(weights)).items():
        if key not in wanted:
            inner = key.removeprefix("base_model.model.")
            for pattern, replacement in LEGACY_NAMES:
                inner = pattern.sub(replacement, inner, count=1)
            key = "base_model.model." + inner
        mapped[key] = value
    stray, missing = sorted(set(mapped) - wanted), sorted(wanted - set(mapped))
    if stray or missing:
        raise ExportError(f"export: the adapters in {weights} do not fit the base model (not in the model: "
                          f"{stray[:3]}; not in the file: {missing[:3]})")
    set_peft_model_state_dict(wrapped, mapped)
    return wrapped


def from_vlm2vec(source: Path, base: Path | None, device: torch.device):
    """(patched model, tokenizer, processor) from a VLM2Vec checkpoint folder: the base (or full) model, its
    adapters, then the prefix of ``pdf.safetensors`` (``integrations.vlm2vec.load_pdf_weights``)."""
    from pdfkernels.integrations.vlm2vec import load_pdf_weights
    from pdfkernels.train.model import image_processor

    if (source / "adapter_config.json").is_file():
        if base is None:
            named = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
            base = Path(named) if named else None
        if base is None or not base.is_dir():
            raise ExportError(f"export: argument '--base' expected the base model's local folder for the adapters "
                              f"in {source}, got {str(base) if base else 'none'} (pass --base DIR)")
        model, model_type = _load_backbone(base)
        model = _load_adapters(model, source)
    else:
        model, model_type = _load_backbone(source)
    model.to(device)
    load_pdf_weights(model, source)
    tokenizer = processor = None
    for folder in (f for f in (source, base) if f is not None):  # the checkpoint's own first, then the base's
        if tokenizer is None and (folder / "tokenizer_config.json").is_file():
            tokenizer = stock_loader.load_tokenizer(str(folder))
        if processor is None and (folder / "preprocessor_config.json").is_file():
            processor = image_processor(source=str(folder), model_type=model_type)
    if tokenizer is None or processor is None:
        log.warning("export: no tokenizer or image processor found in %s or %s: the export has none", source, base)
    return model, tokenizer, processor, str(source)


def read_checkpoint(source: Path, base: Path | None = None, device: torch.device | str = "cpu"):
    """(patched model, tokenizer, processor, description) for either sort of checkpoint; refuses anything else."""
    device = torch.device(device)
    if not source.exists():
        raise ExportError(f"export: CHECKPOINT {source} does not exist")
    if _is_vlm2vec(source):
        return from_vlm2vec(source, base, device)
    if _trainer_checkpoint(source) is not None:
        return from_trainer(source, device)
    raise ExportError(f"export: CHECKPOINT {source} is not a checkpoint: expected our trainer's output folder "
                      f"(checkpoints/step_*.pt), its checkpoints/ folder or a step_*.pt file, or a VLM2Vec "
                      f"checkpoint folder ({VLM2VEC_PDF_FILE} beside adapter_config.json or config.json)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdfkernels.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="trainer output folder / step file, or VLM2Vec checkpoint")
    parser.add_argument("out", type=Path, help="the export folder to write")
    parser.add_argument("--path", type=int, default=0, help="which prefix path to export (default 0)")
    parser.add_argument("--base", type=Path, default=None, help="base model folder of a VLM2Vec adapter checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--no-verify", action="store_true", help="skip the stock-loader equality check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:  # before any loading
            raise ExportError(f"export: OUT {args.out} exists and is not empty; choose another folder or pass "
                              "--overwrite")
        model, tokenizer, processor, source = read_checkpoint(args.checkpoint, args.base)
        out = export(model, args.out, args.path, tokenizer, processor, source, verify=not args.no_verify,
                     overwrite=args.overwrite)
    except (ExportError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    checked = json.loads((out / stock_loader.EXPORT_FILE).read_text()).get("verified_max_difference")
    print(f"exported path {args.path} of {source} to {out}" + (
        "" if checked is None else f" (stock loader vs models.encode: max |difference| {checked:.2e})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
