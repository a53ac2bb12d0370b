"""MMEB data: the generator, the per-step plan, the worker pipeline (identical to the original sampler,
sharded per rank), bad images, row validation, truncation and the Qwen2-VL collator."""

import inspect
import json
import logging

import pytest
import torch
import transformers

from pdfkernels.models.architectures import tiny_qwen2vl
from pdfkernels.train import synthetic
from pdfkernels.train.data import IMAGE_PLACEHOLDER, ImageLoader, Qwen2VLCollator, TrainSampler
from pdfkernels.train.loader import BadData, StepShares, TrainBatches
from pdfkernels.train.model import image_processor, local_tokenizer, set_special_ids
from pdfkernels.train.rows import BadRow, load_eval_rows, load_train_rows
from tests.train.helpers import shapes_data


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


def _collator(max_length=512):
    tokenizer = local_tokenizer(synthetic.all_words())
    config = tiny_qwen2vl(len(tokenizer))
    set_special_ids(config, tokenizer)
    return Qwen2VLCollator(tokenizer, image_processor(32, model_config=config), config, max_length), config


def _subsets(data):
    return [load_train_rows(str(data / "train" / f"{t}.jsonl")) for t in ("t2i", "i2t")]


def _original_batch(subsets, weights, loader, seed, step, size):
    """The sampler before the pipeline (every rank drew and decoded the whole global batch), as reference."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    w = torch.tensor(weights, dtype=torch.float64)
    queries, targets = [], []
    while len(queries) < size:
        subset = subsets[int(torch.multinomial(w, 1, generator=g))]
        row = subset[int(torch.randint(len(subset), (1,), generator=g))]
        queries.append((row["qry"], loader(row["qry_image_path"])))
        targets.append((row["pos_text"], loader(row["pos_image_path"])))
    return queries, targets


def test_generator_writes_mmeb_rows(tmp_path):
    out = synthetic.generate(tmp_path, num_train=6, num_eval=4, seed=0)
    train_rows = load_train_rows(str(out / "train" / "t2i.jsonl")) + load_train_rows(str(out / "train" / "i2t.jsonl"))
    assert len(train_rows) == 6 and {"qry", "qry_image_path", "pos_text", "pos_image_path"} == set(train_rows[0])
    eval_rows = load_eval_rows(str(out / "eval" / "i2t.jsonl"))
    assert all(len(r["tgt_text"]) == synthetic.EVAL_CANDIDATES for r in eval_rows)
    for r in train_rows:
        for key in ("qry_image_path", "pos_image_path"):
            if r[key]:
                assert (out / "images" / r[key]).exists()


@pytest.mark.parametrize("world_size", [1, 2])
def test_pipeline_equals_the_original_sampler_per_rank(data, world_size):
    subsets, loader = _subsets(data), ImageLoader(str(data / "images"))
    collator, _ = _collator()
    sampler = TrainSampler(subsets, [1.0, 3.0], seed=5)
    step, size, chunk = 7, 8, 3
    queries, targets = _original_batch(subsets, [1.0, 3.0], loader, 5, step, size)
    share = size // world_size
    for rank in range(world_size):
        item = StepShares(sampler, loader, collator, size, rank, world_size, chunk)[step]
        for prepared, examples in ((item["queries"], queries), (item["targets"], targets)):
            mine = examples[rank * share:(rank + 1) * share]
            expected = [collator(mine[i:i + chunk]) for i in range(0, share, chunk)]
            got = [collator.assemble(p) for p in prepared]
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert a.keys() == b.keys()
                for key in a:
                    assert torch.equal(a[key], b[key]), key


def test_workers_prefetch_the_same_batches_as_the_training_process(data):
    subsets, loader = _subsets(data), ImageLoader(str(data / "images"))
    collator, _ = _collator()
    shares = StepShares(TrainSampler(subsets, None, seed=1), loader, collator, 6, 0, 1, 4)
    inline = list(TrainBatches(shares, 2, 5, torch.device("cpu"), num_workers=0))
    workers = list(TrainBatches(shares, 2, 5, torch.device("cpu"), num_workers=2))
    assert [s for s, _, _ in inline] == [s for s, _, _ in workers] == [2, 3, 4]  # a resumed run starts at 2
    for (_, qa, ta), (_, qb, tb) in zip(inline, workers):
        for a, b in zip(qa + ta, qb + tb):
            assert all(torch.equal(a[k], b[k]) for k in a)


def _bad_image_data(tmp_path):
    out = synthetic.generate(tmp_path, num_train=4, num_eval=2, seed=0)
    (out / "images" / "corrupt.png").write_bytes(b"not a png")
    rows = [{"qry": f"{IMAGE_PLACEHOLDER} what is shown in the image", "qry_image_path": "corrupt.png",
             "pos_text": "a red circle", "pos_image_path": ""},
            {"qry": "find an image of a red circle", "qry_image_path": "",
             "pos_text": f"{IMAGE_PLACEHOLDER} x", "pos_image_path": "missing.png"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    return out, load_train_rows(str(bad)), load_train_rows(str(out / "train" / "t2i.jsonl"))


def test_bad_images_are_replaced_and_counted_across_workers(tmp_path):
    out, bad_rows, good_rows = _bad_image_data(tmp_path)
    collator, _ = _collator()
    shares = StepShares(TrainSampler([bad_rows, good_rows], [1.0, 1.0], 0), ImageLoader(str(out / "images")),
                        collator, 12, 0, 1, 12, policy="skip")
    counts = {}
    for workers in (0, 2):
        batches = TrainBatches(shares, 0, 4, torch.device("cpu"), num_workers=workers, max_bad_fraction=0.9)
        steps = [(len(q[0]["input_ids"]), len(t[0]["input_ids"])) for _, q, t in batches]
        assert steps == [(12, 12)] * 4 and batches.bad_images > 0 and batches.loads == 48 + batches.bad_images
        counts[workers] = batches.bad_images
    assert counts[0] == counts[2]  # deterministic replacements, summed over the workers


def test_bad_image_stops_the_run_by_flag(tmp_path):
    out, bad_rows, _ = _bad_image_data(tmp_path)
    collator, _ = _collator()
    shares = StepShares(TrainSampler([bad_rows], None, 0), ImageLoader(str(out / "images")), collator, 2, 0, 1, 2,
                        policy="error")
    with pytest.raises(BadData, match=r"bad training image .*(corrupt|missing)\.png"):
        shares[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_bad_stops_with_a_clear_error(data, workers, tmp_path):
    collator, _ = _collator()
    shares = StepShares(TrainSampler(_subsets(data), None, 0), ImageLoader(str(tmp_path / "wrong-dir")), collator,
                        8, 0, 1, 8, policy="skip")
    with pytest.raises(BadData, match="wrong-dir"):
        list(TrainBatches(shares, 0, 100, torch.device("cpu"), num_workers=workers))


def test_a_bad_fraction_over_the_threshold_stops(tmp_path):
    out, bad_rows, good_rows = _bad_image_data(tmp_path)
    collator, _ = _collator()
    shares = StepShares(TrainSampler([bad_rows, good_rows], [9.0, 1.0], 0), ImageLoader(str(out / "images")),
                        collator, 8, 0, 1, 8, policy="skip")
    with pytest.raises(BadData, match=r"training rows had unreadable images, more than --max-bad-fraction 0.2"):
        list(TrainBatches(shares, 0, 50, torch.device("cpu"), num_workers=0, max_bad_fraction=0.2))


GOOD = {"qry": "a red circle", "qry_image_path": "", "pos_text": f"{IMAGE_PLACEHOLDER} x", "pos_image_path": "a.png"}


@pytest.mark.parametrize("row,message", [
    ({k: v for k, v in GOOD.items() if k != "qry"}, "line 2: 'qry' expected a string, got NoneType"),
    ({**GOOD, "pos_image_path": ""}, "line 2: 'pos_text' has <|image_1|> but 'pos_image_path' is empty"),
    ({**GOOD, "qry_image_path": "b.png"}, "line 2: 'qry' has no <|image_1|> but 'qry_image_path' is 'b.png'"),
    ({**GOOD, "pos_text": 3}, "line 2: 'pos_text' expected a string, got int"),
])
def test_malformed_training_rows_are_named_at_start(tmp_path, row, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(BadRow, match=f"{path}.*" + message.replace("|", r"\|").replace("(", r"\(")):
        load_train_rows(str(path))
    assert load_train_rows(str(path), policy="skip") == [GOOD]


def test_empty_and_non_utf8_files(tmp_path, caplog):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"data file {empty} holds no rows"):
        load_train_rows(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"qry": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(BadRow, match=f"{latin} line 2: UnicodeDecodeError"):
        load_train_rows(str(latin))
    with caplog.at_level(logging.WARNING, logger="pdf.data"):
        assert load_train_rows(str(latin), policy="skip") == [GOOD]
    assert "dropped 1 bad rows of 2" in caplog.text
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_bytes(b"\xff\n")
    with pytest.raises(ValueError, match=f"data file {only_bad}: no usable row"):
        load_train_rows(str(only_bad), policy="skip")


def test_eval_rows_with_unequal_candidate_lists_are_refused(tmp_path):
    path = tmp_path / "e.jsonl"
    good = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tgt_img_path": [""]}) + "\n")
    with pytest.raises(BadRow, match=f"{path} line 2: 'tgt_text' has 2 candidates but 'tgt_img_path' has 1"):
        load_eval_rows(str(path))


def test_parquet_eval_rows_as_published(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    assert load_eval_rows(str(tmp_path / "e.parquet")) == rows


def test_truncation_cuts_text_never_image_tokens_and_is_counted_once(data, caplog):
    collator, config = _collator(max_length=3)
    image = ImageLoader(str(data / "images"))(_subsets(data)[0][0]["pos_image_path"])
    with caplog.at_level(logging.WARNING, logger="pdf.data"):
        batch = collator([(f"find an {IMAGE_PLACEHOLDER} image of a red circle", image), ("a red circle", None),
                          ("a large blue square", None)])
    assert collator.truncated == 2 and caplog.text.count("max_length=3") == 1
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[0] == config.image_token_id).sum() == 16  # every image token kept
    assert mask.sum(1).tolist() == [3 + 16 + 2, 3, 3]  # 3 text tokens + image block (start, 16, end)


def test_collator_expands_image_tokens_and_left_pads(data):
    collator, config = _collator()
    image = ImageLoader(str(data / "images"))(_subsets(data)[0][0]["pos_image_path"])
    batch = collator([(f"{IMAGE_PLACEHOLDER} what is shown in the image", image), ("a red circle", None)])
    per_image = int(batch["image_grid_thw"][0].prod()) // 4
    assert (batch["input_ids"][0] == config.image_token_id).sum() == per_image == 16
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    # mm_token_type_ids exactly where the installed transformers' Qwen2-VL takes them (5.x, not 4.52)
    takes = "mm_token_type_ids" in inspect.signature(transformers.Qwen2VLModel.forward).parameters
    assert ("mm_token_type_ids" in batch) == takes == collator.token_types
    if takes:
        assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == config.image_token_id).long())
    assert collator.truncated == 0
    with pytest.raises(ValueError, match="text and image disagree"):
        collator([("a red circle", image)])
