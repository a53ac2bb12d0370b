"""train.run end to end on CPU: metrics, evaluation, exact resume, checkpoints on a signal, two ranks."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import pdfkernels.train.run as run
from pdfkernels.train.checkpoint import checkpoints
from pdfkernels.train.data import ImageLoader, TrainSampler
from pdfkernels.train.rows import load_train_rows
from tests.train.helpers import EVAL_KEYS, run_args, shapes_data, shapes_data_with_negatives


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


def test_short_run_writes_metrics_weights_checkpoints_and_eval(data, tmp_path):
    result = run.main(run_args(data, tmp_path, "--steps", "3"))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert {"loss", "loss_agg", "loss_path", "mi_estimate", "path_cosine", "lr", "samples_per_s"} <= set(lines[0])
    assert (tmp_path / "pdf.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003.pt",
                                                                           "step_0000003.pt.json"]
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert set(evaluation["average"]) == EVAL_KEYS
    assert evaluation["average"]["chance"] == pytest.approx(0.1)
    assert result["eval"] == evaluation


def test_resume_continues_with_the_same_losses(data, tmp_path):
    straight = run.main(run_args(data, tmp_path / "a", "--steps", "4", "--no-evaluate"))["history"]
    first = run.main(run_args(data, tmp_path / "b", "--steps", "4", "--stop-after", "2", "--no-evaluate"))
    assert [m["step"] for m in first["history"]] == [1, 2]
    second = run.main(run_args(data, tmp_path / "b", "--steps", "4", "--resume", "--no-evaluate"))["history"]
    assert [m["step"] for m in second] == [3, 4]
    for a, b in zip(straight[2:], second):
        for key in ("loss", "loss_agg", "loss_path", "mi_estimate", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_sigterm_writes_a_checkpoint_before_exiting(data, tmp_path, monkeypatch):
    original = run.train_step

    def step_then_signal(*args, **kwargs):
        metrics = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(run, "train_step", step_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            run.main(run_args(data, tmp_path, "--steps", "5", "--no-evaluate"))
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert info.value.code == 130
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["step_0000001.pt"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: list[str], results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    decoded = []
    original = ImageLoader.__call__

    def counting(self, path):
        decoded.append(path) if path else None
        return original(self, path)

    ImageLoader.__call__ = counting  # this process only (spawned); --num-workers 0 decodes here
    out = run.main(args)
    params = {}
    if rank == 0:
        from pdfkernels.train.checkpoint import latest

        params = torch.load(latest(args[args.index("--out-dir") + 1] + "/checkpoints"), weights_only=False)["model"]
    results[rank] = (out["history"], params, decoded)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path; with CUDA the trainer uses nccl, one GPU "
                    "per rank")
def test_two_gloo_ranks_equal_one_process_on_the_union_batch(tmp_path_factory, tmp_path):
    """With two hard negatives per query (one run covers both: in-batch and hard negatives are gathered alike;
    spawning ranks is what costs)."""
    data = shapes_data_with_negatives(tmp_path_factory.getbasetemp())
    flags = ("--steps", "2", "--no-evaluate", "--hard-negatives", "2")
    single = run.main(run_args(data, tmp_path / "one", *flags))["history"]
    single_params = torch.load(tmp_path / "one" / "checkpoints" / "step_0000002.pt", weights_only=False)["model"]
    results = mp.Manager().dict()
    args = run_args(data, tmp_path / "two", *flags, "--num-workers", "0")
    mp.spawn(_rank, args=(2, _free_port(), args, results), nprocs=2)
    history, params, _ = results[0]
    # each rank decoded exactly the images of its half of each step's global batch, its negatives' included
    sampler = TrainSampler([load_train_rows(p, hard_negatives=2) for p in args[1:3]], None, 0)
    for rank in (0, 1):
        share = [row for step in (0, 1) for row in sampler.plan(step, 8)[4 * rank:4 * rank + 4]]
        expected = [p for row in share for p in (row["qry_image_path"], row["pos_image_path"],
                                                 *row["neg_image_path"][:2]) if p]
        assert results[rank][2] == expected and 0 < len(expected) < 32
    for a, b in zip(single, history):
        for key in ("loss", "loss_agg", "loss_path", "mi_estimate"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert params.keys() == single_params.keys()
    for name, value in single_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_llava_next_preset_trains_and_evaluates(data, tmp_path):
    """The LLaVA-NeXT family through the same trainer: AnyRes image token counts come from the model."""
    result = run.main(run_args(data, tmp_path, "--steps", "2", "--model", "tiny-llava-next"))
    assert [m["step"] for m in result["history"]] == [1, 2]
    assert all(m["loss"] == m["loss"] for m in result["history"])
    assert set(result["eval"]["average"]) == EVAL_KEYS


def test_bf16_weights_and_autocast_train_and_evaluate_on_the_cpu(data, tmp_path):
    """The GPU default (frozen weights bf16, trainable fp32 masters, bf16 autocast) on the CPU's autocast."""
    from pdfkernels import models
    from pdfkernels.train import precision
    from pdfkernels.train.config import TrainConfig
    from pdfkernels.train.model import build, make_collator
    from pdfkernels.train.synthetic import all_words

    model, _, _ = build(TrainConfig(lora_r=2, prefix_len=3, dtype="bf16"), all_words(), torch.device("cpu"))
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    # LLaVA-NeXT's collator asks the bf16 model for each image's token count
    llava = TrainConfig(model="tiny-llava-next", lora_r=2, prefix_len=3, dtype="bf16")
    model, tokenizer, processor = build(llava, all_words(), torch.device("cpu"))
    collator = make_collator(model, tokenizer, processor, llava.max_length)
    image = ImageLoader(str(data / "images"))(sorted(p.name for p in (data / "images").iterdir())[0])
    batch = collator([("<|image_1|> what is shown in the image", image)])
    with precision.autocast("bf16", torch.device("cpu")):
        reps = models.encode(model, batch, [0, 1])
    assert reps.shape == (2, 1, 64) and torch.isfinite(reps).all()
    result = run.main(run_args(data, tmp_path, "--steps", "2", "--dtype", "bf16", "--lora-r", "2"))
    assert [m["step"] for m in result["history"]] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in result["history"])
    assert set(result["eval"]["average"]) == EVAL_KEYS


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_script_runs_from_the_root_and_from_elsewhere(data, tmp_path, where):
    root = Path(run.__file__).resolve().parents[1]
    cwd = root if where == "root" else tmp_path
    args = run_args(data, tmp_path / "out", "--steps", "2", "--no-evaluate", "--global-batch", "4")
    done = subprocess.run([sys.executable, str(root / "train" / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
