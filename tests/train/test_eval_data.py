"""Eval images checked before the first step (issue 21, item 6): every image an eval row references is checked
from its header; ``--bad-images error`` refuses naming file, row and field, ``skip`` drops the row (query or
positive) or the negative candidate, counts it, and evaluation scores exactly what was kept."""

import json

import pytest
from PIL import Image

import pdfkernels.train.run as run
from pdfkernels.train.eval_data import load_eval_subset
from pdfkernels.train.images import BadImage
from tests.train.helpers import EVAL_KEYS, run_args, shapes_data
from tests.train.test_images import _png_header_only


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


def _rows(data, task):
    return [json.loads(line) for line in (data / "eval" / f"{task}.jsonl").read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _bad_files(folder):
    """One file per kind of bad image the header shows, under ``folder`` (the image dir)."""
    (folder / "text.png").write_text("not an image")
    _png_header_only(folder / "bomb.png", 20000, 20000)  # Pillow's own DecompressionBombError
    _png_header_only(folder / "large.png", 12000, 12000)  # above MAX_IMAGE_PIXELS, below Pillow's 2x
    Image.new("RGB", (201, 1)).save(folder / "strip.png")
    Image.new("F", (4, 4)).save(folder / "float.tiff")
    (folder.parent / "private.png").write_bytes((folder / "strip.png").read_bytes())
    return {"missing.png": "FileNotFoundError", "text.png": "UnidentifiedImageError", "bomb.png": "ecompression",
            "large.png": "decompression-bomb", "strip.png": "aspect ratio 201:1", "float.tiff": "float pixels",
            "../private.png": "outside --image-dir"}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # large.png: refused, as expected
def test_every_kind_of_bad_eval_image_is_refused_naming_file_row_and_field(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "ok.png")
    for name, why in _bad_files(images).items():
        row = {"qry_text": "q", "tgt_text": ["<|image_1|> a", "<|image_1|> b"], "tgt_img_path": ["ok.png", name]}
        path = _write(tmp_path / "eval.jsonl", [{"qry_text": "q", "tgt_text": ["t"]}, row])
        with pytest.raises(BadImage, match=rf"eval.jsonl line 2: 'tgt_img_path\[1\]': .*{why}"):
            load_eval_subset(path, str(images), policy="error")
        assert load_eval_subset(path, str(images), policy="skip").dropped_candidates == 1, name


def test_skip_drops_rows_without_query_or_positive_and_bad_negatives(data, tmp_path):
    t2i, i2t = _rows(data, "t2i"), _rows(data, "i2t")
    t2i[0]["tgt_img_path"][0] = "missing.png"  # the positive: row dropped
    t2i[1]["tgt_img_path"][3] = "missing.png"  # a negative: candidate dropped, row kept
    t2i[2]["tgt_img_path"][4] = t2i[2]["tgt_img_path"][7] = "../outside.png"
    i2t[0]["qry_img_path"] = "missing.png"  # the query: row dropped
    images = str(data / "images")
    kept = load_eval_subset(_write(tmp_path / "t2i.jsonl", t2i), images)
    assert (kept.dropped_rows, kept.dropped_candidates) == (1, 3)
    assert kept.rows[0]["tgt_img_path"] == t2i[1]["tgt_img_path"][:3] + t2i[1]["tgt_img_path"][4:]
    assert len(kept.rows[0]["tgt_text"]) == len(t2i[1]["tgt_text"]) - 1 and kept.rows[2:] == t2i[3:]
    kept = load_eval_subset(_write(tmp_path / "i2t.jsonl", i2t), images)
    assert (kept.dropped_rows, kept.dropped_candidates, kept.rows) == (1, 0, i2t[1:])


def _missing_image_run(data, tmp_path, *extra):
    rows = _rows(data, "i2t")
    rows[0]["qry_img_path"] = "missing.png"
    args = run_args(data, tmp_path / "run", "--steps", "1", *extra)
    args[args.index("--eval-data") + 2] = _write(tmp_path / "i2t.jsonl", rows)
    return args


def test_a_missing_eval_image_stops_before_the_first_step_with_bad_images_error(data, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(run, "train_step", lambda *a, **k: steps.append(1) or {})
    args = _missing_image_run(data, tmp_path, "--bad-images", "error")
    with pytest.raises(BadImage, match=r"i2t.jsonl line 1: 'qry_img_path': image .*missing.png"):
        run.main(args)
    assert steps == [], "training ran before the eval images were checked"


def test_a_missing_eval_image_is_skipped_and_counted_with_bad_images_skip(data, tmp_path):
    args = _missing_image_run(data, tmp_path, "--bad-images", "skip", "--num-workers", "0")
    result = run.main(args)
    assert [m["step"] for m in result["history"]] == [1]
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation == result["eval"]
    assert (evaluation["i2t"]["dropped_rows"], evaluation["i2t"]["dropped_candidates"]) == (1, 0)
    assert (evaluation["t2i"]["dropped_rows"], evaluation["t2i"]["dropped_candidates"]) == (0, 0)
    assert set(evaluation["average"]) == EVAL_KEYS
    assert "i2t 1 rows, 0 candidates" in (tmp_path / "run" / "eval.md").read_text()


def test_the_command_line_says_a_bad_eval_image_in_one_line(data, tmp_path, capsys):
    args = _missing_image_run(data, tmp_path, "--bad-images", "error")
    assert run.cli(args) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "missing.png" in err and "Traceback" not in err


def test_skip_keeps_a_visual_document_row_while_a_relevant_page_is_left(tmp_path):
    """rel_scores rows: candidate 0 need not be relevant; the row goes only when no page with a gain > 0 is left."""
    (tmp_path / "images").mkdir()
    for name in ("q", "p0", "p1", "p2"):
        Image.new("RGB", (32, 32), "white").save(tmp_path / "images" / f"{name}.png")
    row = {"qry_text": "find the page", "qry_img_path": "", "tgt_text": ["<|image_1|>"] * 3,
           "tgt_img_path": ["p0.png", "p1.png", "p2.png"], "rel_scores": [0, 2, 1]}
    rows = [dict(row, tgt_img_path=["gone.png", "p1.png", "p2.png"]),  # an irrelevant page bad: the row stays
            dict(row, tgt_img_path=["p0.png", "gone.png", "gone2.png"]),  # both relevant pages bad: the row goes
            row]
    subset = load_eval_subset(_write(tmp_path / "visdoc.jsonl", rows), str(tmp_path / "images"))
    assert (subset.dropped_rows, subset.dropped_candidates) == (1, 1)
    assert [r["rel_scores"] for r in subset.rows] == [[2.0, 1.0], [0.0, 2.0, 1.0]]
    assert subset.rows[0]["tgt_img_path"] == ["p1.png", "p2.png"]


def test_an_eval_file_mixing_visual_document_and_mmeb_rows_is_refused(tmp_path):
    row = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}
    path = _write(tmp_path / "mixed.jsonl", [row, dict(row, rel_scores=[1, 0])])
    with pytest.raises(ValueError, match=r"mixed.jsonl: 1 of 2 rows have 'rel_scores'; a file is either"):
        load_eval_subset(path, str(tmp_path))
