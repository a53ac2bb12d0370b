"""Tiny random models of every supported type with a padded batch that mixes image and text-only rows."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from pdfkernels.models.anatomy import hf_model
from pdfkernels.models.architectures import (
    IMAGE_TOKEN_ID,
    has_qwen3vl,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5vl,
    tiny_qwen2vl,
    tiny_qwen3vl,
)

# Qwen3-VL where the installed transformers has it (4.57+); on 4.52.3 its cases skip, saying why
_QWEN3VL = pytest.param("qwen3vl", marks=pytest.mark.skipif(
    not has_qwen3vl(), reason=f"transformers {transformers.__version__} has no Qwen3-VL (4.57+)"))
BACKBONES = ["qwen2vl", "qwen2.5vl", _QWEN3VL, "llava-next-mistral", "llava-next-llama", "llava"]
QWEN_BACKBONES = ("qwen2vl", "qwen2.5vl", "qwen3vl")  # the Qwen-VL input layout (pixel patches, grids)
PAD = 0


def build_model(backbone: str) -> torch.nn.Module:
    if backbone == "qwen2vl":
        model = Qwen2VLForConditionalGeneration(tiny_qwen2vl())
    elif backbone == "qwen2.5vl":
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5vl())
    elif backbone == "qwen3vl":
        model = transformers.Qwen3VLForConditionalGeneration(tiny_qwen3vl())
    elif backbone.startswith("llava-next"):
        model = LlavaNextForConditionalGeneration(tiny_llava_next(backbone.rsplit("-", 1)[1]))
    elif backbone == "llava":
        model = LlavaForConditionalGeneration(tiny_llava())
    else:
        raise ValueError(backbone)
    return model.eval()


def _image_block(backbone: str, model) -> list[int]:
    if backbone in QWEN_BACKBONES:
        cfg = model.config
        return [cfg.vision_start_token_id] + [IMAGE_TOKEN_ID] * 4 + [cfg.vision_end_token_id]
    return [IMAGE_TOKEN_ID] * (52 if backbone.startswith("llava-next") else 16)


def mm_token_types(model, ids: torch.Tensor) -> dict:
    """Qwen-VL's ``mm_token_type_ids`` (0 text, 1 image) where the installed transformers takes them (5.x)."""
    if "mm_token_type_ids" not in inspect.signature(type(hf_model(model).model).forward).parameters:
        return {}
    return {"mm_token_type_ids": (ids == IMAGE_TOKEN_ID).long()}


def build_inputs(backbone: str, model, padding: str = "left", batch: int = 3) -> dict:
    """Rows alternate image+text and text-only, with different lengths, padded on ``padding``."""
    rows, images = [], 0
    for b in range(batch):
        text = torch.randint(10, 100, (3 + 2 * b,)).tolist()
        if b % 2 == 0:
            rows.append(text[:2] + _image_block(backbone, model) + text[2:])
            images += 1
        else:
            rows.append(text)
    length = max(len(r) for r in rows)
    ids = torch.full((batch, length), PAD, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row)
        mask[b, span] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if backbone in QWEN_BACKBONES:
        inputs["pixel_values"] = torch.randn(images * 16, 3 * 2 * 4 * 4)
        inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * images)
        inputs.update(mm_token_types(model, ids))
    elif backbone.startswith("llava-next"):
        inputs["pixel_values"] = torch.randn(images, 3, 3, 16, 16)
        inputs["image_sizes"] = torch.tensor([[16, 32]] * images)
    else:
        inputs["pixel_values"] = torch.randn(images, 3, 16, 16)
    return inputs
