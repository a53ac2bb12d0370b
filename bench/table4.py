"""The paper's Table 4 on a CPU: parameters, trainable share and inference TFLOPs of VLM2Vec and PDF-VLM2Vec
(Qwen2-VL-2B architecture, meta device, no weights and no GPU needed).

    python -m pdfkernels.bench.table4

Counting convention (the one under which the paper's Table 4 figures reproduce): FLOPs of Linear and Conv
layers at 2 x MACs, the LM head over all T tokens, attention score/value products not counted, one 1344x1344
image (9216 patches, 2304 merged visual tokens, T = 2314 tokens with 10 text tokens). Single prefix adds the
prefix attention products 4 * T * K * d_model per layer; the aggregate runs the vision tower once, the
language model on both paths (with their prefix attention) and the LM head once. VLM2Vec: DoRA r = 8 on text
q/k/v/o/down_proj.

The same counts follow for the other backbone presets (``BACKBONES``: Qwen2.5-VL-3B / -7B, Qwen3-VL-2B where the
installed transformers has it), with no paper figures to compare: their image gives ``(1344 / patch)^2`` patches
(Qwen3-VL's patch is 16). DoRA goes on the text q/k/v/o/down_proj (``VLM2VEC_TARGETS``; the adapted-module
count is printed); VLM2Vec's own comma-separated list, matched by name anywhere, would also adapt Qwen2.5-VL's
32 vision-MLP ``down_proj`` layers.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys

import torch

from pdfkernels import models
from pdfkernels.bench.flops import linear_conv_flops
from pdfkernels.models.architectures import has_qwen3vl
from pdfkernels.models.families import PRESETS, model_class
from pdfkernels.train.config import VLM2VEC_TARGETS

PAPER = {"vlm2vec_params_b": 2.214, "vlm2vec_share": 0.211, "pdf_params_b": 2.219, "pdf_share": 0.449,
         "baseline_tflops": 18.925, "single_tflops": 18.937, "aggregate_tflops": 24.999}
IMAGE_SIDE, TEXT_TOKENS, NUM_PATHS, PREFIX_LEN = 1344, 10, 2, 20
_MERGED = ("merger", "deepstack_merger_list")  # vision modules that see the merged tokens (Qwen3-VL: DeepStack)
# the presets (models/families.py) counted; Table 4 is the first
BACKBONES = ("qwen2vl-2b", "qwen2.5vl-3b", "qwen2.5vl-7b") + (("qwen3vl-2b",) if has_qwen3vl() else ())


def _meta_model(preset: str = "qwen2vl-2b"):
    model_type, architecture = PRESETS[preset]
    cls = model_class(model_type, f"preset {preset!r}")
    with torch.device("meta"):
        model = cls(architecture(0))  # the real presets keep their own vocabulary
    if hasattr(model, "set_attn_implementation"):  # 4.54+; 4.52's classes read the config
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    return model


def _linear_conv_flops(fn) -> int:
    with torch.no_grad():
        return linear_conv_flops(fn)


def _vision_flops(visual: torch.nn.Module, patches: int, merged: int) -> int:
    """2 x MACs of the vision tower's Conv3d and Linear layers, read off the modules: every layer sees all
    patches except the merger's, which see the merged tokens. (Its rotary position ids need real grid
    data, so the tower cannot run on the meta device; its layers are exactly these.)"""
    total = 0
    for name, module in visual.named_modules():
        tokens = merged if name.startswith(_MERGED) else patches
        if isinstance(module, torch.nn.Linear):
            total += 2 * tokens * module.in_features * module.out_features
        elif isinstance(module, torch.nn.Conv3d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.kernel_size[2]
            total += 2 * tokens * module.out_channels * module.in_channels * kernel
    return total


@functools.cache  # Table 4 and the backbone table share the Qwen2-VL-2B counts; callers only read them
def parameter_rows(preset: str = "qwen2vl-2b") -> dict:
    import peft

    lora = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights="gaussian",
                           target_modules=VLM2VEC_TARGETS)
    with contextlib.redirect_stderr(io.StringIO()):
        baseline = peft.get_peft_model(_meta_model(preset), lora)
    total = sum(p.numel() for p in baseline.parameters())
    trainable = sum(p.numel() for p in baseline.parameters() if p.requires_grad)
    adapted = sum(1 for n, _ in baseline.named_modules() if n.endswith(".lora_A"))
    hidden = models.text_config(baseline).hidden_size
    models.apply_pdf(baseline, num_paths=NUM_PATHS, prefix_len=PREFIX_LEN)
    prefix = models.pdf_parameters(baseline)[0].numel()
    aggregator = sum(p.numel() for p in models.Aggregator(hidden, NUM_PATHS).parameters())
    return {"vlm2vec_total": total, "vlm2vec_trainable": trainable, "adapted_modules": adapted,
            "pdf_total": total + prefix + aggregator, "pdf_trainable": trainable + prefix + aggregator,
            "prefix": prefix, "aggregator": aggregator}


@functools.cache
def flop_rows(preset: str = "qwen2vl-2b") -> dict:
    model = _meta_model(preset)
    cfg, text = model.config, models.text_config(model)
    grid = IMAGE_SIDE // cfg.vision_config.patch_size
    visual_tokens = grid * grid // cfg.vision_config.spatial_merge_size ** 2
    tokens = visual_tokens + TEXT_TOKENS
    inner = models.patch.inner_model(model)
    vision = _vision_flops(inner.visual, grid * grid, visual_tokens)
    embeds = torch.empty(1, tokens, text.hidden_size, device="meta")
    positions = torch.arange(tokens, device="meta").view(1, 1, -1).expand(3, 1, -1)
    language = _linear_conv_flops(lambda: inner.language_model(inputs_embeds=embeds, position_ids=positions,
                                                               use_cache=False))
    head = _linear_conv_flops(lambda: model.lm_head(embeds))
    # the prefix's score and value products: 2 x (T x K x heads x head_dim) MACs each, per layer
    width = text.num_attention_heads * getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    prefix_attention = 4 * tokens * PREFIX_LEN * width * text.num_hidden_layers
    return {"tokens": tokens, "vision": vision, "language": language, "lm_head": head,
            "baseline": vision + language + head,
            "single": vision + language + head + prefix_attention,
            "aggregate": vision + NUM_PATHS * (language + prefix_attention) + head}


def table() -> tuple[str, list[dict]]:
    p, f = parameter_rows(), flop_rows()
    rows = [
        ("VLM2Vec (DoRA r=8) parameters (B)", p["vlm2vec_total"] / 1e9, PAPER["vlm2vec_params_b"]),
        ("VLM2Vec trainable (%)", 100 * p["vlm2vec_trainable"] / p["vlm2vec_total"], PAPER["vlm2vec_share"]),
        ("PDF-VLM2Vec parameters (B)", p["pdf_total"] / 1e9, PAPER["pdf_params_b"]),
        ("PDF-VLM2Vec trainable (%)", 100 * p["pdf_trainable"] / p["pdf_total"], PAPER["pdf_share"]),
        ("TFLOPs, baseline", f["baseline"] / 1e12, PAPER["baseline_tflops"]),
        ("TFLOPs, single prefix", f["single"] / 1e12, PAPER["single_tflops"]),
        ("TFLOPs, aggregate (2 paths)", f["aggregate"] / 1e12, PAPER["aggregate_tflops"]),
    ]
    records = [{"row": name, "ours": ours, "paper": paper, "difference_pct": 100 * (ours - paper) / paper}
               for name, ours, paper in rows]
    lines = ["| Table 4 row | ours | paper | difference |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['ours']:.4f} | {r['paper']} | {r['difference_pct']:+.3f}% |" for r in records]
    lines.append(f"\nexact counts: {p['vlm2vec_trainable']:,} of {p['vlm2vec_total']:,} (VLM2Vec); "
                 f"{p['pdf_trainable']:,} of {p['pdf_total']:,} (PDF; prefix {p['prefix']:,}, aggregator "
                 f"{p['aggregator']:,}); T = {f['tokens']} tokens")
    return "\n".join(lines), records


def backbone_rows() -> list[dict]:
    """Table 4's counts for every backbone preset (same convention; no paper figures)."""
    records = []
    for preset in BACKBONES:
        p, f = parameter_rows(preset), flop_rows(preset)
        records.append({"backbone": preset, **p, "tokens": f["tokens"],
                        **{f"tflops_{k}": f[k] / 1e12 for k in ("baseline", "single", "aggregate")}})
    return records


def backbone_table() -> tuple[str, list[dict]]:
    records = backbone_rows()
    lines = ["| backbone | VLM2Vec params (B) | trainable (%) | DoRA modules | PDF params (B) | trainable (%) | T | "
             "TFLOPs baseline | single prefix | aggregate (2 paths) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['backbone']} | {r['vlm2vec_total'] / 1e9:.4f} | "
                     f"{100 * r['vlm2vec_trainable'] / r['vlm2vec_total']:.4f} | {r['adapted_modules']} | "
                     f"{r['pdf_total'] / 1e9:.4f} | "
                     f"{100 * r['pdf_trainable'] / r['pdf_total']:.4f} | {r['tokens']} | {r['tflops_baseline']:.4f} | "
                     f"{r['tflops_single']:.4f} | {r['tflops_aggregate']:.4f} |")
    return "\n".join(lines), records


if __name__ == "__main__":
    text, _ = table()
    print(text + "\n\nOther backbones, same convention:\n\n" + backbone_table()[0])
    sys.exit(0)
