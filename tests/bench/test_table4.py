"""Table 4 on the meta device reproduces the paper within 0.1% (parameter rows, baseline and aggregate TFLOPs);
the other backbone presets have their published sizes and follow the same counting convention."""

import pytest
import torch

from pdfkernels import models
from pdfkernels.bench.table4 import BACKBONES, PREFIX_LEN, _meta_model, backbone_table, flop_rows, parameter_rows, table
from pdfkernels.models.anatomy import decoder_stack, geometry

# total parameters (billions, as the Hugging Face model cards of Qwen/<name>-Instruct round them)
PUBLISHED_B = {"qwen2vl-2b": 2.21, "qwen2.5vl-3b": 3.75, "qwen2.5vl-7b": 8.29, "qwen3vl-2b": 2.13}


def test_exact_parameter_counts():
    p = parameter_rows()
    assert (p["vlm2vec_trainable"], p["vlm2vec_total"]) == (4_673_536, 2_213_659_136)
    assert (p["prefix"], p["aggregator"]) == (573_440, 4_723_202)
    assert (p["pdf_trainable"], p["pdf_total"]) == (9_970_178, 2_218_955_778)


def test_flops_follow_the_counting_convention():
    f = flop_rows()
    assert f["tokens"] == 2314
    assert f["baseline"] / 1e12 == pytest.approx(18.9248, abs=5e-4)


def test_rows_match_the_paper():
    _, rows = table()
    for r in rows:
        assert abs(r["difference_pct"]) < 0.1, r["row"]


@pytest.mark.parametrize("preset", list(BACKBONES))
def test_backbone_presets_have_the_published_sizes(preset):
    total = sum(p.numel() for p in _meta_model(preset).parameters())
    assert round(total / 1e9, 2) == PUBLISHED_B[preset]


@pytest.mark.parametrize("preset", list(BACKBONES))
def test_backbone_counts_follow_the_convention(preset):
    """Language FLOPs are 2 x T x (text Linear weights); the prefix is N x K x layers x 2 x KV heads x head_dim;
    the aggregate runs the language model and the prefix products twice."""
    model = _meta_model(preset)
    f, p = flop_rows(preset), parameter_rows(preset)
    weights = sum(m.weight.numel() for m in decoder_stack(model).modules() if isinstance(m, torch.nn.Linear))
    assert f["language"] == 2 * f["tokens"] * weights
    layers, kv_heads, head_dim = geometry(model)
    assert p["prefix"] == 2 * PREFIX_LEN * layers * 2 * kv_heads * head_dim
    assert f["aggregate"] - f["baseline"] == f["language"] + 2 * (f["single"] - f["baseline"])
    assert f["tokens"] == (1344 // model.config.vision_config.patch_size) ** 2 // 4 + 10
    d, n = models.text_config(model).hidden_size, 2  # aggregator: Linear(N·d, d), SiLU, Linear(d, N)
    assert p["aggregator"] == (n * d * d + d) + (d * n + n)


def test_backbone_table_has_every_preset():
    text, rows = backbone_table()
    assert [r["backbone"] for r in rows] == list(BACKBONES)
    assert all(f"| {name} |" in text for name in BACKBONES)
