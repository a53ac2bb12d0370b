"""MMEB data: the generator, the seeded sampler, bad images, and the Qwen2-VL collator."""

import json

import pytest
import torch

from pdfkernels.models.configs import tiny_qwen2vl
from pdfkernels.train import synthetic
from pdfkernels.train.data import IMAGE_PLACEHOLDER, ImageLoader, Qwen2VLCollator, TrainSampler, load_rows
from pdfkernels.train.model import image_processor, local_tokenizer, set_special_ids


def test_generator_writes_mmeb_rows(tmp_path):
    out = synthetic.generate(tmp_path, num_train=6, num_eval=4, seed=0)
    train_rows = load_rows(str(out / "train" / "t2i.jsonl")) + load_rows(str(out / "train" / "i2t.jsonl"))
    assert len(train_rows) == 6 and {"qry", "qry_image_path", "pos_text", "pos_image_path"} <= set(train_rows[0])
    eval_rows = load_rows(str(out / "eval" / "i2t.jsonl"))
    assert all(len(r["tgt_text"]) == synthetic.EVAL_CANDIDATES for r in eval_rows)
    for r in train_rows:
        for key in ("qry_image_path", "pos_image_path"):
            if r[key]:
                assert (out / "images" / r[key]).exists()


def test_sampler_is_deterministic_per_step(tmp_path):
    out = synthetic.generate(tmp_path, num_train=20, num_eval=2, seed=0)
    subsets = [load_rows(str(out / "train" / f"{t}.jsonl")) for t in ("t2i", "i2t")]
    a = TrainSampler(subsets, [1.0, 3.0], ImageLoader(str(out / "images")), seed=5)
    b = TrainSampler(subsets, [1.0, 3.0], ImageLoader(str(out / "images")), seed=5)
    qa, _ = a.batch(7, 6)
    qb, _ = b.batch(7, 6)
    assert [q[0] for q in qa] == [q[0] for q in qb]


def _rows_with_bad_image(tmp_path):
    out = synthetic.generate(tmp_path, num_train=4, num_eval=2, seed=0)
    bad = tmp_path / "bad.jsonl"
    (out / "images" / "corrupt.png").write_bytes(b"not a png")
    rows = [{"qry": f"{IMAGE_PLACEHOLDER} what is shown in the image", "qry_image_path": "corrupt.png",
             "pos_text": "a red circle", "pos_image_path": ""},
            {"qry": "find an image of a red circle", "qry_image_path": "", "pos_text": "x",
             "pos_image_path": "missing.png"}]
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    return out, load_rows(str(bad)), load_rows(str(out / "train" / "t2i.jsonl"))


def test_bad_images_are_counted_and_skipped(tmp_path):
    out, bad_rows, good_rows = _rows_with_bad_image(tmp_path)
    loader = ImageLoader(str(out / "images"))
    sampler = TrainSampler([bad_rows, good_rows], [1.0, 1.0], loader, seed=0, policy="skip")
    queries, targets = sampler.batch(0, 12)
    assert len(queries) == 12 and loader.bad > 0


def test_bad_image_stops_the_run_by_flag(tmp_path):
    out, bad_rows, _ = _rows_with_bad_image(tmp_path)
    sampler = TrainSampler([bad_rows], None, ImageLoader(str(out / "images")), seed=0, policy="error")
    with pytest.raises(RuntimeError, match=r"bad training image .*(corrupt|missing)\.png"):
        sampler.batch(0, 2)


def test_collator_expands_image_tokens_and_left_pads(tmp_path):
    out = synthetic.generate(tmp_path, num_train=2, num_eval=2, seed=0)
    tokenizer = local_tokenizer(synthetic.all_words())
    config = tiny_qwen2vl(len(tokenizer))
    set_special_ids(config, tokenizer)
    collator = Qwen2VLCollator(tokenizer, image_processor(32), config)
    image = ImageLoader(str(out / "images"))(load_rows(str(out / "train" / "t2i.jsonl"))[0]["pos_image_path"])
    batch = collator([(f"{IMAGE_PLACEHOLDER} what is shown in the image", image), ("a red circle", None)])
    per_image = int(batch["image_grid_thw"][0].prod()) // 4
    assert (batch["input_ids"][0] == config.image_token_id).sum() == per_image == 16
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == config.image_token_id).long())
    with pytest.raises(ValueError, match="text and image disagree"):
        collator([("a red circle", image)])
