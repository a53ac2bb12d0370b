"""Inputs that crashed the same step on every resume (issue 21, item 3): caught at validation (a row refused
naming file and line) or handled by ``--bad-images`` (skipped and counted), in training and evaluation."""

import json
import shutil

import pytest
import torch
from PIL import Image

import pdfkernels.train.run as run
from pdfkernels.models.architectures import tiny_qwen2vl
from pdfkernels.train import synthetic
from pdfkernels.train.data import Qwen2VLCollator
from pdfkernels.train.model import image_processor, local_tokenizer, set_special_ids
from pdfkernels.train.rows import BadRow, load_eval_rows, load_train_rows
from tests.train.helpers import shapes_data
from tests.train.test_images import _png_header_only

TYPED = "a <|image_pad|> <|vision_start|> typed"  # special tokens a user typed: text, not image tokens


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_typed_special_tokens_are_text_not_image_tokens():
    tokenizer = local_tokenizer(synthetic.all_words())
    config = tiny_qwen2vl(len(tokenizer))
    set_special_ids(config, tokenizer)
    collator = Qwen2VLCollator(tokenizer, image_processor(32, model_config=config), config)
    special = {config.image_token_id, config.vision_start_token_id, config.vision_end_token_id}
    text_only = collator([(TYPED, None)])
    assert not special & set(text_only["input_ids"].flatten().tolist())
    with_image = collator([("<|image_1|> " + TYPED, Image.new("RGB", (32, 32), "red"))])
    ids = with_image["input_ids"][0]
    expected = int(with_image["image_grid_thw"][0].prod()) // config.vision_config.spatial_merge_size ** 2
    assert int((ids == config.image_token_id).sum()) == expected  # only the image's own tokens
    assert int((ids == config.vision_start_token_id).sum()) == 1


@pytest.mark.parametrize("text", ["", "   \t "], ids=["empty", "whitespace"])
def test_a_side_with_no_text_and_no_image_is_refused_naming_file_and_line(tmp_path, text):
    good = {"qry": "a red circle", "qry_image_path": "", "pos_text": "a circle", "pos_image_path": ""}
    path = _write(tmp_path / "train.jsonl", [good, {**good, "pos_text": text}])
    with pytest.raises(BadRow, match=r"train.jsonl line 2: 'pos_text' is (empty|whitespace only)"):
        load_train_rows(path)
    assert len(load_train_rows(path, "skip")) == 1
    eval_row = {"qry_text": "a red circle", "qry_img_path": "", "tgt_text": ["a circle", text],
                "tgt_img_path": ["", ""]}
    with pytest.raises(BadRow, match=r"eval.jsonl line 1: 'tgt_text\[1\]' is"):
        load_eval_rows(_write(tmp_path / "eval.jsonl", [eval_row]))


def test_bad_images_and_typed_special_tokens_train_and_evaluate_to_the_end(data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    Image.new("RGB", (201, 1), "red").save(images / "strip.png")  # aspect ratio above Qwen2-VL's 200
    _png_header_only(images / "bomb.png", 20000, 20000)  # a decompression bomb
    rows = [json.loads(line) for line in (data / "train" / "t2i.jsonl").read_text().splitlines()][:4]
    typed = [{**r, "qry": r["qry"] + " " + TYPED} for r in rows]
    bad = [{**rows[0], "pos_image_path": name} for name in ("strip.png", "bomb.png")]
    train = _write(tmp_path / "train.jsonl", typed + bad)
    eval_rows = [json.loads(line) for line in (data / "eval" / "t2i.jsonl").read_text().splitlines()][:4]
    evaluation = _write(tmp_path / "eval.jsonl", [{**r, "qry_text": r["qry_text"] + " " + TYPED} for r in eval_rows])
    out = tmp_path / "run"
    result = run.main(["--train-data", train, "--eval-data", evaluation, "--image-dir", str(images),
                       "--out-dir", str(out), "--global-batch", "8", "--chunk-size", "4", "--steps", "2",
                       "--warmup-steps", "1", "--prefix-len", "2", "--num-workers", "0", "--bad-images", "skip"])
    assert [m["step"] for m in result["history"]] == [1, 2]
    assert result["history"][-1]["bad_images"] > 0  # the strip and the bomb were drawn and skipped
    assert torch.isfinite(torch.tensor([m["loss"] for m in result["history"]])).all()
    assert set(result["eval"]["eval"]) >= {"single", "aggregate", "none"}


class _Refusing:
    """An image processor that refuses images 31 pixels wide, as a real one refuses what it cannot resize."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, images, **kwargs):
        if any(img.width == 31 for img in images):
            raise ValueError("cannot process an image 31 pixels wide")
        return self.inner(images=images, **kwargs)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_an_image_the_processor_refuses_is_a_bad_image(data, tmp_path, policy):
    from pdfkernels.train.data import ImageLoader, TrainSampler
    from pdfkernels.train.loader import BadData, StepShares

    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    Image.new("RGB", (31, 32), "red").save(images / "narrow.png")
    rows = load_train_rows(str(data / "train" / "t2i.jsonl"))[:6]
    rows = [{**rows[0], "pos_image_path": "narrow.png"}] + rows[1:]
    tokenizer = local_tokenizer(synthetic.all_words())
    config = tiny_qwen2vl(len(tokenizer))
    set_special_ids(config, tokenizer)
    collator = Qwen2VLCollator(tokenizer, _Refusing(image_processor(32, model_config=config)), config)
    shares = StepShares(TrainSampler([rows], None, 0), ImageLoader(str(images)), collator, 6, 0, 1, 3, policy)
    step = next(s for s in range(50) if any(r["pos_image_path"] == "narrow.png" for r in shares.sampler.plan(s, 6)))
    if policy == "error":
        with pytest.raises(BadData, match=r"narrow.png: the image processor refused it"):
            shares[step]
        return
    item = shares[step]
    assert item["bad"] >= 1 and "narrow.png" in item["first_bad"]
    assert all(chunk["images"]["image_grid_thw"].shape[0] == 3 for chunk in item["targets"])  # full chunks
