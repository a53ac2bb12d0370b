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
