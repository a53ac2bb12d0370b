"""python -m pdfkernels.embed on an exported trainer run: the trainer's Precision@1 and embeddings reproduced, a
kill -9 mid-run then a rerun gives identical files, two torchrun ranks give the same files, bad rows and images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pdfkernels.train.run as trainer
from pdfkernels import embed, export
from tests.train.helpers import run_args, shapes_data

EVAL_BATCH = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short trainer run (with its evaluation) and its export: (data, run folder, export folder)."""
    root = tmp_path_factory.mktemp("embed")
    data = shapes_data(tmp_path_factory.getbasetemp())
    trainer.main(run_args(data, root / "run", "--steps", "3", "--eval-batch-size", str(EVAL_BATCH),
                          "--num-workers", "0"))
    assert export.main([str(root / "run"), str(root / "export")]) == 0
    return data, root / "run", root / "export"


def _args(data: Path, model: Path, out: Path, *extra: str, files=("eval/t2i.jsonl", "eval/i2t.jsonl")) -> list[str]:
    """Arguments of one embed run over ``files`` (relative to the data set, or absolute)."""
    return ["--model", str(model), "--data", *[str(data / f) for f in files], "--image-dir", str(data / "images"),
            "--out", str(out), "--batch-size", str(EVAL_BATCH), "--shard-size", str(EVAL_BATCH), "--num-workers", "0",
            *extra]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_embed_reproduces_the_trainers_precision_and_embeddings(trained, tmp_path):
    data, run, exported = trained
    assert embed.main(_args(data, exported, tmp_path / "emb", "--score")) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    scores = json.loads((tmp_path / "emb" / "scores.json").read_text())
    assert scores == {name: evaluation[name]["single"] for name in ("t2i", "i2t")}

    # the embeddings themselves: the trainer's evaluation encoder on the checkpoint, single prefix (path 0)
    from pdfkernels.train.config import parse
    from pdfkernels.train.data import ImageLoader
    from pdfkernels.train.evaluate import encode_items, unique_items
    from pdfkernels.train.model import make_collator
    from pdfkernels.train.rows import load_eval_rows

    model, tokenizer, processor, _ = export.read_checkpoint(run)
    model.eval()
    config = parse(run_args(data, tmp_path / "unused", "--eval-batch-size", str(EVAL_BATCH), "--num-workers", "0"))
    config.num_paths = 1  # encode path 0 only: the "single" mode, no aggregator
    collator = make_collator(model, tokenizer, processor, config.max_length)
    items = []
    for name in ("t2i", "i2t"):
        queries, candidates, _, _ = unique_items(load_eval_rows(str(data / "eval" / f"{name}.jsonl")))
        emb, failed = encode_items(model, collator, queries + candidates, ImageLoader(config.image_dir), config,
                                   None, torch.device("cpu"))
        assert not failed
        items.append(emb["single"])
    got = F.normalize(embed.read_embeddings(tmp_path / "emb"), dim=-1)
    assert got.shape == torch.cat(items).shape
    assert (got - torch.cat(items)).abs().max() <= 1e-5
    listed = [json.loads(line) for line in (tmp_path / "emb" / "items.jsonl").read_text().splitlines()]
    assert [x["id"] for x in listed] == list(range(len(got)))


def test_kill_9_then_rerun_gives_identical_files(trained, tmp_path):
    data, _, exported = trained
    files = ("eval/t2i.jsonl", "eval/i2t.jsonl", "train/t2i.jsonl", "train/i2t.jsonl")
    assert embed.main(_args(data, exported, tmp_path / "clean", files=files)) == 0
    total = len(list((tmp_path / "clean").glob("shard-*.json")))

    command = [sys.executable, "-m", "pdfkernels.embed", *_args(data, exported, tmp_path / "killed", files=files)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").glob("shard-*.json")) and process.poll() is None:
        assert time.monotonic() < deadline, "no shard written in 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list((tmp_path / "killed").glob("shard-*.json")))
    assert 0 < done < total, f"the kill came after {done} of {total} shards: nothing left to resume"

    assert embed.main(_args(data, exported, tmp_path / "killed", files=files)) == 0
    assert _files(tmp_path / "killed") == _files(tmp_path / "clean")


def test_two_torchrun_ranks_write_the_same_files(trained, tmp_path):
    data, _, exported = trained
    assert embed.main(_args(data, exported, tmp_path / "one")) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pdfkernels.embed", *_args(data, exported, tmp_path / "two")]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_bad_rows_and_images_stop_naming_the_line_or_are_left_out(trained, tmp_path, capsys):
    data, _, exported = trained
    lines = (data / "eval" / "t2i.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    broken["tgt_img_path"] = broken["tgt_img_path"][:-1]  # one image path fewer than candidates
    missing = json.loads(lines[2])
    missing["qry_img_path"] = "no/such.png"
    missing["qry_text"] = missing["qry_text"] if "<|image_1|>" in missing["qry_text"] else "<|image_1|> a"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(broken), lines[3]]) + "\n")
    assert embed.main(_args(data, exported, tmp_path / "a", files=(bad,))) == 1
    assert f"{bad} line 2" in capsys.readouterr().err
    assert embed.main(_args(data, exported, tmp_path / "b", "--bad-rows", "skip", files=(bad,))) == 0
    rows = (tmp_path / "b" / "rows.jsonl").read_text().splitlines()
    assert [json.loads(r)["line"] for r in rows] == [1, 3]

    image = tmp_path / "image.jsonl"
    image.write_text("\n".join([lines[0], json.dumps(missing)]) + "\n")
    assert embed.main(_args(data, exported, tmp_path / "c", "--bad-images", "error", files=(image,))) == 1
    err = capsys.readouterr().err
    assert f"{image} line 2" in err and "no/such.png" in err
    assert embed.main(_args(data, exported, tmp_path / "d", files=(image,))) == 0
    assert [json.loads(r)["line"] for r in (tmp_path / "d" / "rows.jsonl").read_text().splitlines()] == [1]


def test_other_settings_into_the_same_out_are_refused(trained, tmp_path, capsys):
    data, _, exported = trained
    assert embed.main(_args(data, exported, tmp_path / "emb", files=("eval/t2i.jsonl",))) == 0
    assert embed.main(_args(data, exported, tmp_path / "emb", "--save-dtype", "float16",
                            files=("eval/t2i.jsonl",))) == 1
    assert "other settings (save_dtype: 'float32' -> 'float16')" in capsys.readouterr().err
    assert embed.main(["--model", str(tmp_path), "--data", "x", "--out", str(tmp_path / "o")]) == 1
    assert "--model expected an export folder" in capsys.readouterr().err


def _video_rows(folder: Path) -> Path:
    """An eval file of video queries (frame folders under ``folder/images``, not the shared data set's) against
    text candidates."""
    from tests.train.video_helpers import moving_square, write_frames

    rows = []
    for i, color in enumerate([(220, 30, 30), (30, 30, 220)]):
        write_frames(folder / "images" / f"clip{i}", moving_square(4, color=color, seed=i))
        rows.append({"qry_text": "<|video_1|> a moving square", "qry_img_path": "", "qry_video_path": f"clip{i}",
                     "tgt_text": ["red square", "blue square"], "tgt_img_path": ["", ""]})
    path = folder / "video.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_video_rows_are_embedded_with_their_frames_as_the_trainer_encodes_them(trained, tmp_path):
    data, run, exported = trained
    videos = _video_rows(tmp_path)
    images = str(tmp_path / "images")
    assert embed.main(_args(data, exported, tmp_path / "emb", "--num-frames", "2", "--image-dir", images,
                            files=(videos,))) == 0
    listed = [json.loads(line) for line in (tmp_path / "emb" / "items.jsonl").read_text().splitlines()]
    assert [x["video"] for x in listed] == ["clip0", "clip1", "", ""]  # two distinct queries, shared candidates

    from pdfkernels.train.config import parse
    from pdfkernels.train.data import ImageLoader
    from pdfkernels.train.evaluate import encode_items, unique_items
    from pdfkernels.train.model import make_collator
    from pdfkernels.train.rows import load_eval_rows

    model, tokenizer, processor, _ = export.read_checkpoint(run)
    config = parse(run_args(data, tmp_path / "unused", "--eval-batch-size", str(EVAL_BATCH), "--num-workers", "0",
                            "--num-frames", "2"))
    config.num_paths = 1
    queries, candidates, _, _ = unique_items(load_eval_rows(str(videos)))
    emb, failed = encode_items(model.eval(), make_collator(model, tokenizer, processor, config.max_length),
                               queries + candidates, ImageLoader(images, num_frames=2), config, None,
                               torch.device("cpu"))
    assert not failed
    got = F.normalize(embed.read_embeddings(tmp_path / "emb"), dim=-1)
    assert (got - emb["single"]).abs().max() <= 1e-5
    assert (got[0] - got[1]).abs().max() > 1e-3  # the frames reach the model: two clips, one text


@pytest.mark.parametrize("flag, value", [("--num-frames", "0"), ("--image-resolution", "-1"),
                                         ("--num-workers", "-1"), ("--video-fps", "-1")])
def test_out_of_range_video_and_loader_flags_are_refused_naming_them(trained, tmp_path, capsys, flag, value):
    data, _, exported = trained
    args = _args(data, exported, tmp_path / "emb", flag, value)
    assert embed.main(args) == 1
    assert f"{flag} expected" in capsys.readouterr().err


def test_video_rows_for_a_family_that_reads_no_video_are_refused_before_any_shard(trained, tmp_path, capsys,
                                                                                  monkeypatch):
    import dataclasses

    from pdfkernels.models.families import FAMILIES

    data, _, exported = trained
    monkeypatch.setitem(FAMILIES, "qwen2_vl", dataclasses.replace(FAMILIES["qwen2_vl"], video=False))
    assert embed.main(_args(data, exported, tmp_path / "emb", "--image-dir", str(tmp_path / "images"),
                            files=(_video_rows(tmp_path),))) == 1
    assert "--data holds video rows, which Qwen2-VL does not read here" in capsys.readouterr().err
    assert not (tmp_path / "emb").exists()  # refused before anything is written


def test_a_re_export_into_the_same_model_folder_is_not_resumed_into_the_old_shards(trained, tmp_path, capsys):
    import shutil

    data, run, exported = trained
    model = shutil.copytree(exported, tmp_path / "export")
    assert embed.main(_args(data, model, tmp_path / "emb")) == 0
    assert export.main([str(run), str(model), "--path", "1", "--overwrite"]) == 0  # another prefix, same folder
    assert embed.main(_args(data, model, tmp_path / "emb")) == 1
    assert "other settings (model_sha256:" in capsys.readouterr().err


def test_a_visual_document_row_stays_while_a_relevant_page_is_left(trained, tmp_path):
    """The evaluation's rule (train/eval_data.py) for rel_scores rows: candidate 0 need not be relevant."""
    data, _, exported = trained
    lines = [json.loads(line) for line in (data / "eval" / "t2i.jsonl").read_text().splitlines()[:3]]
    for row in lines:
        row["tgt_img_path"][0] = "no/such.png"
        row["tgt_text"][0] = row["tgt_text"][0] if "<|image_1|>" in row["tgt_text"][0] else "<|image_1|>"
    gains = [[1, 2] + [0] * (len(r["tgt_text"]) - 2) for r in lines]  # a relevant page left
    gains[1] = [1] + [0] * (len(lines[1]["tgt_text"]) - 1)  # only the bad page was relevant
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(dict(r, rel_scores=g)) + "\n" for r, g in zip(lines, gains)))
    assert embed.main(_args(data, exported, tmp_path / "emb", files=(docs,))) == 0
    rows = [json.loads(r) for r in (tmp_path / "emb" / "rows.jsonl").read_text().splitlines()]
    assert [(r["line"], len(r["targets"])) for r in rows] == [(1, len(lines[0]["tgt_text"]) - 1),
                                                             (3, len(lines[2]["tgt_text"]) - 1)]


def test_a_bad_negative_image_drops_that_candidate_and_the_score_is_the_trainers(trained, tmp_path):
    """As train/eval_data.py: a bad query or positive image drops the row, a bad negative only that candidate."""
    data, run, exported = trained
    lines = (data / "eval" / "t2i.jsonl").read_text().splitlines()
    negative = json.loads(lines[1])
    negative["tgt_img_path"][2] = "no/such.png"
    negative["tgt_text"][2] = negative["tgt_text"][2] if "<|image_1|>" in negative["tgt_text"][2] else "<|image_1|>"
    subset = tmp_path / "negative.jsonl"
    subset.write_text("\n".join([lines[0], json.dumps(negative), *lines[2:]]) + "\n")
    assert embed.main(_args(data, exported, tmp_path / "emb", "--score", files=(subset,))) == 0
    rows = [json.loads(r) for r in (tmp_path / "emb" / "rows.jsonl").read_text().splitlines()]
    assert [len(r["targets"]) for r in rows[:3]] == [len(negative["tgt_text"]), len(negative["tgt_text"]) - 1,
                                                    len(negative["tgt_text"])]

    from pdfkernels.train.config import parse
    from pdfkernels.train.data import ImageLoader
    from pdfkernels.train.eval_data import load_eval_subset
    from pdfkernels.train.evaluate import evaluate_subset
    from pdfkernels.train.model import make_collator

    model, tokenizer, processor, _ = export.read_checkpoint(run)
    config = parse(run_args(data, tmp_path / "unused", "--eval-batch-size", str(EVAL_BATCH), "--num-workers", "0"))
    config.num_paths = 1
    kept = load_eval_subset(str(subset), config.image_dir).rows
    trainer_score = evaluate_subset(model.eval(), make_collator(model, tokenizer, processor, config.max_length), kept,
                                    ImageLoader(config.image_dir), config, None, torch.device("cpu"))["single"]
    assert json.loads((tmp_path / "emb" / "scores.json").read_text()) == {"negative": trainer_score}
