"""MMEB-scale evaluation: the same Precision@1 as the original per-query loop, exactly one forward per
distinct query and distinct candidate, ties against the positive, non-finite embeddings refused, and two
gloo ranks sharing the encoding."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pdfkernels import models
from pdfkernels.bench.eval_per_query import precision_at_1
from pdfkernels.train import images, synthetic
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import IMAGE_PLACEHOLDER, BadImage, ImageLoader
from pdfkernels.train.evaluate import evaluate, evaluate_subset, hits, mode_groups, score_subset, unique_items
from pdfkernels.train.model import build, make_collator
from tests.train.helpers import shapes_data

PICTURE = f"{IMAGE_PLACEHOLDER} what is shown in the image"


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


def _setup(data, **overrides):
    config = TrainConfig(prefix_len=3, image_dir=str(data / "images"), eval_batch_size=5, num_workers=0,
                         **overrides)
    model, tokenizer, processor = build(config, synthetic.all_words(), torch.device("cpu"))
    model.eval()
    aggregator = models.Aggregator(64, config.num_paths) if config.num_paths > 1 else None
    return config, model, make_collator(model, tokenizer, processor, config.max_length), aggregator


def _pool_rows(data):
    """Queries sharing one candidate pool (texts and images), some queries repeated; an identical text
    candidate makes some rows certain hits so that P@1 is neither 0 nor 1."""
    images = sorted(p.name for p in (data / "images").iterdir())[:4]
    texts = ["a red circle", "a large blue square", "a small green cross", "a yellow triangle"]
    pool = [(t, "") for t in texts] + [(PICTURE, p) for p in images]
    rows = []
    for i in range(7):
        cands = [pool[(i + j * 3) % len(pool)] for j in range(4)]
        query = cands[0] if i % 3 == 0 else ("find an image of " + texts[i % 4], "")
        rows.append({"qry_text": query[0], "qry_img_path": query[1], "tgt_text": [c[0] for c in cands],
                     "tgt_img_path": [c[1] for c in cands]})
    return rows + rows[:2]


def test_same_precision_as_the_original_loop(data):
    config, model, collator, aggregator = _setup(data)
    loader = ImageLoader(config.image_dir)
    rows = _pool_rows(data)
    new = evaluate_subset(model, collator, rows, loader, config, aggregator, "cpu")
    for paths, group in mode_groups(config):
        for mode in group:
            use = [0] if mode == "single" else paths
            old = precision_at_1(model, collator, rows, loader, use, aggregator, "cpu", chunk=5)
            assert new[mode] == pytest.approx(old), mode
    assert 0 < new["single"] < 1


def test_one_forward_per_distinct_query_and_candidate(data, monkeypatch):
    config, model, collator, aggregator = _setup(data)
    rows = _pool_rows(data)
    queries, candidates, _, _ = unique_items(rows)
    assert len(queries) < len(rows) and len(candidates) < sum(len(r["tgt_text"]) for r in rows)
    encoded: dict = {}
    original = models.encode

    def counting(model, inputs, paths):
        key = tuple(paths) if paths is not None else None
        encoded[key] = encoded.get(key, 0) + inputs["input_ids"].shape[0]
        return original(model, inputs, paths)

    monkeypatch.setattr(models, "encode", counting)
    evaluate_subset(model, collator, rows, ImageLoader(config.image_dir), config, aggregator, "cpu")
    assert encoded == {(0, 1): len(queries) + len(candidates), None: len(queries) + len(candidates)}


def test_ties_count_against_the_positive():
    same = torch.nn.functional.normalize(torch.ones(3, 4), dim=-1)
    assert not hits(same[:1], same, [[0, 1, 2]]).any()
    distinct = torch.eye(3)
    assert hits(distinct[:1], distinct, [[0, 1, 2]]).all()
    assert hits(distinct[:1], distinct, [[0, 0, 1]]).all()  # a copy of the positive is no rival


def _text_eval_file(tmp_path):
    path = tmp_path / "texts.jsonl"
    row = {"qry_text": "find a red circle", "qry_img_path": "", "tgt_text": ["a red circle", "a blue square"],
           "tgt_img_path": ["", ""]}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "qry_text": "find a blue square"}) + "\n")
    return str(path)


def test_non_finite_embeddings_are_refused(data, tmp_path):
    config, model, collator, aggregator = _setup(data, eval_data=[_text_eval_file(tmp_path)])
    with torch.no_grad():
        models.pdf_parameters(model)[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"texts \(single\): \d+ of \d+ embeddings are not finite"):
        evaluate(model, collator, config, aggregator, "cpu", tmp_path)
    assert not (tmp_path / "eval.json").exists()


def test_a_signal_stops_evaluation(data, tmp_path):
    config, model, collator, aggregator = _setup(data, eval_data=[_text_eval_file(tmp_path)])
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, collator, config, aggregator, "cpu", tmp_path, should_stop=lambda: True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, data, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    config, model, collator, aggregator = _setup(data)
    rows = _pool_rows(data)
    counted = [0]
    original = models.encode

    def counting(model, inputs, paths):
        counted[0] += inputs["input_ids"].shape[0] if paths is None else 0
        return original(model, inputs, paths)

    models.encode = counting
    result = evaluate_subset(model, collator, rows, ImageLoader(config.image_dir), config, aggregator, "cpu")
    results[rank] = (result, counted[0])
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path")
def test_two_gloo_ranks_share_the_encoding_and_agree(data):
    config, model, collator, aggregator = _setup(data)
    rows = _pool_rows(data)
    single = evaluate_subset(model, collator, rows, ImageLoader(config.image_dir), config, aggregator, "cpu")
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), data, results), nprocs=2)
    queries, candidates, _, _ = unique_items(rows)
    total = len(queries) + len(candidates)
    assert [results[r][1] for r in (0, 1)] == [-(-total // 2), total - -(-total // 2)]
    for r in (0, 1):
        assert results[r][0] == pytest.approx(single)


def _damaged_pool(data, tmp_path):
    """``_pool_rows`` over a copy of its images, and ``damaged.png``: a valid header, its pixel data cut."""
    (tmp_path / "images").mkdir()
    for name in sorted(p.name for p in (data / "images").iterdir())[:4]:
        (tmp_path / "images" / name).write_bytes((data / "images" / name).read_bytes())
    rows = _pool_rows(tmp_path)  # before damaged.png exists: the pool is the four images
    whole = (tmp_path / "images" / name).read_bytes()
    (tmp_path / "images" / "damaged.png").write_bytes(whole[:len(whole) // 2])
    return rows


def test_an_image_that_fails_only_when_decoded_is_left_out_with_skip_and_stops_with_error(data, tmp_path):
    config, model, collator, aggregator = _setup(data, bad_images="skip")
    loader = ImageLoader(str(tmp_path / "images"))
    rows = _damaged_pool(data, tmp_path)
    images.check(str(tmp_path / "images"), "damaged.png")  # its header is fine: the start check keeps it
    broken = [dict(r, tgt_text=list(r["tgt_text"]), tgt_img_path=list(r["tgt_img_path"])) for r in rows]
    broken[1]["tgt_text"][2], broken[1]["tgt_img_path"][2] = PICTURE, "damaged.png"  # a negative
    broken[2]["qry_text"], broken[2]["qry_img_path"] = PICTURE, "damaged.png"  # a query
    expected = [r for i, r in enumerate(rows) if i != 2]
    expected[1] = dict(rows[1], tgt_text=[t for j, t in enumerate(rows[1]["tgt_text"]) if j != 2],
                       tgt_img_path=[p for j, p in enumerate(rows[1]["tgt_img_path"]) if j != 2])
    result, dropped_rows, dropped_candidates = score_subset(model, collator, broken, loader, config, aggregator, "cpu")
    assert (dropped_rows, dropped_candidates) == (1, 1)
    assert result == pytest.approx(evaluate_subset(model, collator, expected, loader, config, aggregator, "cpu"))
    config.bad_images = "error"
    with pytest.raises(BadImage, match=r"bad eval image .*damaged.png"):
        score_subset(model, collator, broken, loader, config, aggregator, "cpu")


def test_a_visual_document_row_whose_page_fails_when_decoded_stays_while_a_relevant_page_is_left(data, tmp_path):
    """The start check's rule (eval_data.candidates_to_drop) for pages that fail only when decoded: candidate 0
    of a rel_scores row need not be relevant; the failed page leaves the pool, as if never listed."""
    config, model, collator, aggregator = _setup(data, bad_images="skip")
    loader = ImageLoader(str(tmp_path / "images"))
    rows = [dict(r, rel_scores=[1.0, 2.0, 0.0, 0.0]) for r in _damaged_pool(data, tmp_path)[:4]]
    rows[3]["rel_scores"] = [1.0, 0.0, 0.0, 0.0]  # only its first page is relevant
    broken = [dict(r, tgt_text=[PICTURE, *r["tgt_text"][1:]], tgt_img_path=["damaged.png", *r["tgt_img_path"][1:]])
              for r in rows]
    expected = [{k: (v[1:] if k in ("tgt_text", "tgt_img_path", "rel_scores") else v) for k, v in r.items()}
                for r in rows[:3]]
    result, dropped_rows, dropped_candidates = score_subset(model, collator, broken, loader, config, aggregator, "cpu")
    assert (dropped_rows, dropped_candidates) == (1, 3)
    assert result == pytest.approx(evaluate_subset(model, collator, expected, loader, config, aggregator, "cpu"))
