"""The backbone presets: each real one builds its published architecture with the class that trains it (on the
meta device: no weights), its image processor cuts the patches that architecture embeds; the tiny Qwen2.5-VL /
Qwen3-VL presets train and evaluate; a class the installed transformers lacks is refused, naming it."""

import importlib

import pytest
import torch
import transformers

import pdfkernels.train.run as run
from pdfkernels.models.architectures import has_qwen3vl
from pdfkernels.models.families import FAMILIES, PRESETS
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader
from pdfkernels.train.model import backbone, make_collator
from pdfkernels.train.synthetic import all_words
from tests.bench.test_table4 import PUBLISHED_B
from tests.train.helpers import EVAL_KEYS, run_args, shapes_data

_NO_QWEN3VL = pytest.mark.skipif(not has_qwen3vl(), reason=f"transformers {transformers.__version__} has no "
                                 "Qwen3-VL (4.57+)")
REAL = ["qwen2vl-2b", "qwen2.5vl-3b", "qwen2.5vl-7b", pytest.param("qwen3vl-2b", marks=_NO_QWEN3VL)]
TINY = ["tiny-qwen2.5vl", pytest.param("tiny-qwen3vl", marks=_NO_QWEN3VL)]


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("preset", REAL)
def test_real_presets_build_the_published_architecture(preset, data):
    model, tokenizer, processor = backbone(TrainConfig(model=preset), all_words(), torch.device("meta"))
    model_type = PRESETS[preset][0]
    assert type(model).__name__ == FAMILIES[model_type].stock_class
    assert model.config.model_type == model_type
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == PUBLISHED_B[preset]
    # the processor's patches are what the vision tower embeds, and the collator counts its tokens
    vision = model.config.vision_config
    image = ImageLoader(str(data / "images"))(sorted(p.name for p in (data / "images").iterdir())[0])
    batch = make_collator(model, tokenizer, processor, 64)([("<|image_1|> what is shown", image)])
    assert batch["pixel_values"].shape[-1] == vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert tokens == int(batch["image_grid_thw"].prod()) // vision.spatial_merge_size ** 2 > 0


@pytest.mark.parametrize("preset", TINY)
def test_tiny_presets_of_the_new_backbones_train_and_evaluate(preset, data, tmp_path):
    result = run.main(run_args(data, tmp_path, "--steps", "2", "--model", preset))
    assert [m["step"] for m in result["history"]] == [1, 2]
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in result["history"])
    assert set(result["eval"]["average"]) == EVAL_KEYS


def test_a_class_the_installed_transformers_lacks_is_refused(monkeypatch):
    # as on 4.52 (the lazy module would import the class again on a plain delattr). The first access loads the
    # class, after which transformers 5.x registers a new lazy module in sys.modules: patch the one an import
    # now returns (models/families.py imports transformers on use)
    getattr(transformers, "Qwen3VLForConditionalGeneration", None)
    monkeypatch.setattr(importlib.import_module("transformers"), "Qwen3VLForConditionalGeneration", None,
                        raising=False)
    with pytest.raises(ValueError, match=r"model preset 'qwen3vl-2b' needs transformers' "
                       r"Qwen3VLForConditionalGeneration \(transformers >= 4\.57\); the installed transformers"):
        backbone(TrainConfig(model="qwen3vl-2b"), all_words(), torch.device("meta"))
    with pytest.raises(ValueError, match=r"'model' expected a preset \[.*'qwen2\.5vl-3b'.*\] or a local directory"):
        backbone(TrainConfig(model="qwen9"), all_words(), torch.device("meta"))


def test_image_resolution_resizes_every_image_as_vlm2vec_does(data):
    """--image-resolution 1344 (VLM2Vec's "high", the paper's HR): Qwen2-VL-2B sees 96 x 96 patches, 2304 image
    tokens (Table 4's); the stored 32-pixel image alone gives far fewer."""
    model, tokenizer, processor = backbone(TrainConfig(model="qwen2vl-2b"), all_words(), torch.device("meta"))
    image = ImageLoader(str(data / "images"))(sorted(p.name for p in (data / "images").iterdir())[0])
    counts = {}
    for side in (0, 1344):
        batch = make_collator(model, tokenizer, processor, 64, image_side=side)([("<|image_1|> what is shown", image)])
        counts[side] = int((batch["input_ids"] == model.config.image_token_id).sum())
        if side:
            assert batch["image_grid_thw"].tolist() == [[1, 96, 96]]
    assert counts[1344] == 2304 and counts[0] < 100
