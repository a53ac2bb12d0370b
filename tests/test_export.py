"""Export -> stock-transformers loader: embeddings equal ``models.encode(model, inputs, paths=P)`` on every
supported family, left and right padding, with images; the loader imports nothing of pdfkernels; refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

from pdfkernels import models, stock_loader
from pdfkernels.export import PREFIX_FILE, ExportError, export, main
from tests.models.builders import BACKBONES, build_inputs, build_model
from tests.models.phi3v_double import build_phi3v

TOLERANCE = 1e-5
DORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def trained_like(backbone: str, seed: int = 0) -> torch.nn.Module:
    """A patched tiny model inside DoRA whose prefix and adapters are far from their initial values, so that a
    prefix lost or shifted, or adapters not merged, change the embedding."""
    torch.manual_seed(seed)
    model = models.apply_pdf(build_model(backbone), num_paths=2, prefix_len=3, seed=seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                       init_lora_weights="gaussian", target_modules=DORA_TARGETS))
    with torch.no_grad():
        models.pdf_parameters(model)[0].mul_(10)
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_stock_loader_equals_models_encode(backbone, tmp_path):
    model = trained_like(backbone)
    batches = {padding: build_inputs(backbone, model, padding) for padding in ("left", "right")}
    with torch.no_grad():
        expected = {p: models.encode(model, b, paths=1)[0] for p, b in batches.items()}
        unprefixed = {p: models.encode(model, b, paths=None)[0] for p, b in batches.items()}
    export(model, tmp_path / "export", path=1)

    embedder = stock_loader.load(tmp_path / "export")
    assert "pdf_prefix" not in dict(embedder.model.named_parameters())
    assert not any("lora" in n for n, _ in embedder.model.named_parameters())  # merged, stock modules only
    for padding, batch in batches.items():
        got = embedder.embed(batch)
        assert got.shape == expected[padding].shape
        # the prefix matters: without it the embedding is far off, so equality below can fail
        assert (unprefixed[padding] - expected[padding]).abs().max() > 1e-2
        assert (got - expected[padding]).abs().max() <= TOLERANCE, padding


def test_export_writes_the_described_format(tmp_path):
    model = trained_like("qwen2vl")
    prefix = models.pdf_parameters(model)[0].detach().clone()  # [layers, N, 2, Hkv, K, D]
    out = export(model, tmp_path / "export", path=1)
    described = json.loads((out / "pdf_export.json").read_text())
    assert described["format"] == "pdfkernels-prefix-cache" and described["version"] == 1
    assert (described["path"], described["num_paths"], described["prefix_len"]) == (1, 2, 3)
    assert described["architecture"] == "Qwen2VLForConditionalGeneration"
    assert 0 <= described["verified_max_difference"] <= 1e-4
    from safetensors.torch import load_file

    stored = load_file(str(out / PREFIX_FILE))
    assert torch.equal(stored["keys"], prefix[:, 1, 0]) and torch.equal(stored["values"], prefix[:, 1, 1])
    assert (out / "stock_loader.py").read_text() == open(stock_loader.__file__).read()
    assert not (tmp_path / "export.partial").exists()


def test_shipped_loader_runs_without_pdfkernels_or_triton(tmp_path):
    model = trained_like("llava")
    batch = build_inputs("llava", model, "left")
    with torch.no_grad():
        expected = models.encode(model, batch, paths=0)[0]
    out = export(model, tmp_path / "export", path=0)
    torch.save(batch, tmp_path / "batch.pt")
    # an environment without them: this interpreter's site-packages minus pdfkernels and triton (linked entry by
    # entry), no .pth files (-S: the editable install's finder never runs), no user site or current directory (-I)
    bare = tmp_path / "site"
    bare.mkdir()
    for folder in [Path(p) for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]:
        for entry in folder.iterdir():
            if not entry.name.lower().startswith(("pdfkernels", "__editable__", "triton")) and not (
                    bare / entry.name).exists():
                (bare / entry.name).symlink_to(entry)
    script = f"""
import sys
sys.path.append({str(bare)!r})
import torch
sys.path.insert(0, {str(out)!r})
import stock_loader
embedder = stock_loader.load({str(out)!r})
torch.save(embedder.embed(torch.load({str(tmp_path / 'batch.pt')!r})), {str(tmp_path / 'got.pt')!r})
for name in ('pdfkernels', 'triton'):
    try:
        __import__(name)
    except ImportError:
        continue
    raise AssertionError(name + ' is importable: the check proves nothing')
"""
    subprocess.run([sys.executable, "-I", "-S", "-c", script], check=True, cwd=tmp_path)
    assert (torch.load(tmp_path / "got.pt") - expected).abs().max() <= TOLERANCE


def test_refusals_name_the_argument(tmp_path):
    model = trained_like("qwen2vl")
    with pytest.raises(ExportError, match=r"argument 'path' expected an int in \[0, 2\), got 2"):
        export(model, tmp_path / "a", path=2)
    with pytest.raises(ExportError, match="unpatched"):
        export(build_model("qwen2vl"), tmp_path / "b")
    with pytest.raises(ExportError, match="Phi3VForCausalLM cannot be exported"):
        export(models.apply_pdf(build_phi3v(), num_paths=2, prefix_len=2), tmp_path / "c")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(model, tmp_path / "full")


def test_cli_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main([str(tmp_path / "notes"), str(tmp_path / "out")]) == 1
    assert "is not a checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# VLM2Vec's vendored models name their modules as Hugging Face did before 4.52; its adapters carry those names
LEGACY = {"qwen2vl": ("base_model.model.model.language_model.", "base_model.model.model."),
          "llava-next-mistral": ("base_model.model.model.language_model.", "base_model.model.language_model.model.")}


@pytest.mark.parametrize("backbone", list(LEGACY))
def test_vlm2vec_adapter_checkpoint_exports_to_the_same_embeddings(backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    base = build_model(backbone)
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights="gaussian",
                                                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|"
                                                                     r"o_proj|down_proj)"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.05 * torch.randn_like(p))
    checkpoint = tmp_path / "checkpoint-10"
    model.save_pretrained(checkpoint)  # what VLM2Vec's MMEBModel.save writes for LoRA: the adapters only
    weights = checkpoint / "adapter_model.safetensors"
    new, old = LEGACY[backbone]
    save_file({k.replace(new, old): v for k, v in load_file(str(weights)).items()}, str(weights))
    models.apply_pdf(model, num_paths=2, prefix_len=3, seed=2)
    with torch.no_grad():
        models.pdf_parameters(model)[0].mul_(10)
    models.save_pdf(checkpoint / "pdf.safetensors", model)  # what pdf_trainer's _save adds
    batch = build_inputs(backbone, model.eval(), "left")
    with torch.no_grad():
        expected = models.encode(model, batch, paths=1)[0]

    assert main([str(checkpoint), str(tmp_path / "export"), "--path", "1", "--base", str(tmp_path / "base")]) == 0
    got = stock_loader.load(tmp_path / "export").embed(batch)
    assert (got - expected).abs().max() <= TOLERANCE


def test_adapters_that_do_not_fit_the_base_are_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base = build_model("qwen2vl")
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "adapter_model.safetensors"
    stored = load_file(str(weights))
    save_file(dict(list(stored.items())[1:]), str(weights))  # one adapter tensor missing
    models.save_pdf(tmp_path / "ckpt" / "pdf.safetensors", models.apply_pdf(model, num_paths=2, prefix_len=2))
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--base", str(tmp_path / "base")]) == 1
    assert "do not fit the base model" in capsys.readouterr().err
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--base", str(tmp_path / "nowhere")]) == 1
    assert "argument '--base' expected the base model's local folder" in capsys.readouterr().err
