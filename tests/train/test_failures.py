"""The trainer under failure (issue 15): NaN, reused folders, changed resume settings, damaged checkpoints, a
full disk, signals during data loading, invalid settings. Whole runs use the tiny model for 1-4 steps."""

import errno
import json
import os
import signal
import time

import pytest
import torch

import pdfkernels.train.run as run
from pdfkernels.train import checkpoint, guards, metrics_log, outdir, resume, signals
from pdfkernels.train.config import TrainConfig, parse
from pdfkernels.train.step import Parts
from tests.train.helpers import run_args, shapes_data


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    previous = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _strict_lines(path):
    """metrics.jsonl parsed as strict JSON (a bare NaN/Infinity fails)."""
    def refuse(name):
        raise ValueError(f"bare {name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _names(folder):
    return [p.name for p in checkpoint.checkpoints(folder)]


def _tiny_parts(seed=0) -> Parts:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Parts(model, None, None, optimizer, None, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))


# --- item 3: NaN training ------------------------------------------------------------------------------

def test_diverging_run_stops_naming_step_and_term_keeps_finite_checkpoints(data, tmp_path, capsys):
    code = run.cli(run_args(data, tmp_path, "--steps", "4", "--lr", "1e25", "--checkpoint-every", "1",
                            "--keep-checkpoints", "1"))
    assert code == 1
    message = capsys.readouterr().err
    assert "non-finite" in message and "step " in message, message
    kept = checkpoint.checkpoints(tmp_path / "checkpoints")
    assert kept, "the last finite checkpoint was pruned"
    for path in kept:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path
    assert not (tmp_path / "pdf.safetensors").exists() and not (tmp_path / "eval.json").exists()
    lines = _strict_lines(tmp_path / "metrics.jsonl")
    failed_step = int(message.split("step ")[1].split(":")[0])
    assert lines[-1]["step"] == failed_step and None in lines[-1].values()  # NaN written as null


def test_check_step_names_the_first_non_finite_term():
    with pytest.raises(guards.NonFiniteError, match=r"step 7: non-finite mi_estimate"):
        guards.check_step({"loss_agg": 1.0, "loss_path": 2.0, "mi_estimate": float("nan"),
                           "loss": float("nan")}, 7)
    guards.check_step({"loss": 1.0, "grad_norm": 3.0}, 7)  # finite: no error


def test_non_finite_gradient_skips_the_update_and_is_reported():
    parts = _tiny_parts()
    gradients = guards.GradientGuard(parts)
    before = parts.model.weight.detach().clone()
    parts.model(torch.ones(1, 3)).sum().backward()
    parts.model.bias.grad[0] = float("nan")
    parts.optimizer.step()
    assert torch.equal(parts.model.weight, before) and gradients.bad == "gradient of model weight bias"
    with pytest.raises(guards.NonFiniteError, match=r"step 3: non-finite gradient of model weight bias"):
        guards.check_step({"loss": 1.0}, 3, gradients.bad)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    parts = _tiny_parts()
    checkpoint.save(tmp_path, 1, parts, TrainConfig(), keep=1, run_id="r")
    with torch.no_grad():
        parts.model.weight[0, 0] = float("inf")
    with pytest.raises(guards.NonFiniteError, match=r"step 2: model weight weight is not finite"):
        guards.check_state(parts, 2)
    assert _names(tmp_path) == ["step_0000001.pt"]


# --- item 7: a new run in an old run's folder -------------------------------------------------------------

def test_used_folder_is_refused_and_overwrite_replaces_the_old_run(data, tmp_path):
    run.main(run_args(data, tmp_path, "--steps", "2", "--stop-after", "1", "--no-evaluate"))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(outdir.OutDirError, match=r"holds an earlier run .*--resume.*--overwrite"):
        run.main(run_args(data, tmp_path, "--steps", "3", "--no-evaluate"))
    assert (tmp_path / "metrics.jsonl").read_text() == before and _names(tmp_path / "checkpoints") == [
        "step_0000001.pt"]
    old_run = json.loads((tmp_path / outdir.RUN_FILE).read_text())["run"]
    run.main(run_args(data, tmp_path, "--steps", "1", "--no-evaluate", "--overwrite"))
    assert [m["step"] for m in _strict_lines(tmp_path / "metrics.jsonl")] == [1]
    assert _names(tmp_path / "checkpoints") == ["step_0000001.pt"]
    assert json.loads((tmp_path / outdir.RUN_FILE).read_text())["run"] != old_run


def test_pruning_keeps_other_runs_checkpoints_and_never_overwrites_a_later_one(tmp_path):
    parts = _tiny_parts()
    checkpoint.save(tmp_path, 1, parts, TrainConfig(), keep=1, run_id="old")
    for step in (2, 3, 4):
        checkpoint.save(tmp_path, step, parts, TrainConfig(), keep=1, run_id="new")
    assert _names(tmp_path) == ["step_0000001.pt", "step_0000004.pt"]  # "new" pruned only its own
    with pytest.raises(checkpoint.CheckpointError, match="later checkpoint step_0000004.pt"):
        checkpoint.save(tmp_path, 3, parts, TrainConfig(), keep=1, run_id="new")


# --- item 5: --resume with a changed config -------------------------------------------------------------

def test_resume_refuses_fixed_changes_applies_lr_and_never_goes_back(data, tmp_path, caplog):
    base = ("--steps", "6", "--no-evaluate")
    run.main(run_args(data, tmp_path, *base, "--stop-after", "2"))
    ckpt = tmp_path / "checkpoints" / "step_0000002.pt"
    original = ckpt.read_bytes()
    with pytest.raises(resume.ResumeError, match=r"prefix_len: checkpoint 3, now 4"):
        run.main(run_args(data, tmp_path, *base, "--resume", "--prefix-len", "4"))
    with pytest.raises(resume.ResumeError, match=r"--steps 1 is below the step .* \(2\)"):
        run.main(run_args(data, tmp_path, "--steps", "1", "--no-evaluate", "--resume"))
    assert ckpt.read_bytes() == original
    caplog.set_level("WARNING", logger="pdf")
    history = run.main(run_args(data, tmp_path, *base, "--resume", "--lr", "5e-4", "--stop-after", "1"))["history"]
    assert [m["step"] for m in history] == [3]
    assert history[0]["lr"] == pytest.approx(5e-4 * (6 - 3) / (6 - 1))  # new base lr, schedule position kept
    assert "lr 0.001 -> 0.0005" in caplog.text


# --- item 10: damaged checkpoints, a full disk, metrics, settings ----------------------------------------

def test_truncated_latest_checkpoint_falls_back_and_metrics_are_trimmed(data, tmp_path, caplog):
    args = ("--steps", "2", "--checkpoint-every", "1", "--no-evaluate")
    first = run.main(run_args(data, tmp_path, *args))["history"]
    latest = tmp_path / "checkpoints" / "step_0000002.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    caplog.set_level("WARNING", logger="pdf")
    second = run.main(run_args(data, tmp_path, *args, "--resume"))["history"]
    assert "step_0000002.pt is damaged" in caplog.text
    assert [m["step"] for m in second] == [2]  # continued from step 1
    assert second[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    assert [m["step"] for m in _strict_lines(tmp_path / "metrics.jsonl")] == [1, 2]
    assert (latest.parent / "step_0000002.pt.damaged").exists()


def test_empty_checkpoint_is_skipped_and_all_damaged_is_an_error(tmp_path):
    parts = _tiny_parts()
    checkpoint.save(tmp_path, 1, parts, TrainConfig(), keep=0, run_id="r")
    checkpoint.save(tmp_path, 2, parts, TrainConfig(), keep=0, run_id="r")
    (tmp_path / "step_0000002.pt").write_bytes(b"")
    path, state = checkpoint.load_latest_intact(tmp_path)
    assert path.name == "step_0000001.pt" and state["step"] == 1
    (tmp_path / "step_0000001.pt").write_bytes(b"")
    (tmp_path / "step_0000001.pt.json").unlink()  # unverified and unreadable
    with pytest.raises(checkpoint.CheckpointError, match=r"no intact checkpoint .*step_0000001.pt"):
        checkpoint.load_latest_intact(tmp_path)


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "torch-wrapped"])
def test_full_disk_removes_the_partial_file_and_says_no_space_left(tmp_path, monkeypatch, wrapped):
    parts = _tiny_parts()
    (tmp_path / ".step_0000007.pt.tmp").write_bytes(b"left by a kill -9")
    checkpoint.save(tmp_path, 1, parts, TrainConfig(), keep=2, run_id="r")

    def full_disk(state, f):
        f.write(b"partial")
        error = OSError(errno.ENOSPC, "No space left on device")
        if not wrapped:
            raise error
        try:  # what torch.save raises when the file's write fails
            raise error
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="no space left on device .*step_0000002.pt"):
        checkpoint.save(tmp_path, 2, parts, TrainConfig(), keep=2, run_id="r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001.pt", "step_0000001.pt.json"]
    assert checkpoint.damage(tmp_path / "step_0000001.pt") is None


def test_signal_during_a_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(state, f):
        f.write(b"partial")
        raise signals.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(signals.Interrupted):
        checkpoint.save(tmp_path, 1, _tiny_parts(), TrainConfig(), keep=2, run_id="r")
    assert list(tmp_path.iterdir()) == []


def test_metrics_lines_are_strict_json_and_trim_drops_later_and_torn_lines(tmp_path):
    line = metrics_log.json_line({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(metrics_log.json_line({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    metrics_log.trim(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("flag,value,name", [("--checkpoint-every", "0", "checkpoint_every"),
                                             ("--log-every", "0", "log_every"),
                                             ("--temperature", "0", "temperature"),
                                             ("--lr", "nan", "lr")])
def test_settings_that_would_divide_by_zero_or_diverge_are_refused(flag, value, name):
    with pytest.raises(ValueError, match=f"'{name}' expected"):
        parse([flag, value])


def test_stale_pdf_weights_temp_file_is_replaced(tmp_path):
    from pdfkernels import models
    from tests.models.builders import build_model

    model = models.apply_pdf(build_model("qwen2vl"), num_paths=2, prefix_len=2)
    (tmp_path / ".pdf.safetensors.tmp").write_bytes(b"left by a kill")
    models.save_pdf(tmp_path / "pdf.safetensors", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pdf.safetensors"]


# --- item 9 (signals) -------------------------------------------------------------------------------------

def test_signal_guard_defers_the_first_signal_and_raises_on_the_second_or_when_interruptible():
    guard = signals.SignalGuard()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # inside a step: deferred
        assert guard.requested == signal.SIGTERM
        with pytest.raises(signals.Interrupted):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: at once
    finally:
        guard.restore()
    guard = signals.SignalGuard()
    try:
        with pytest.raises(signals.Interrupted), guard.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached in full: the handler raises inside the sleep
    finally:
        guard.restore()


def test_sigterm_stops_a_hanging_batch_load_with_a_checkpoint(data, tmp_path, monkeypatch):
    real_pipeline = run.train_batches

    class HangingPipeline:  # the real pipeline, but loading step 1's batch never returns (e.g. a stuck worker)
        def __init__(self, *args, **kwargs):
            self.inner = real_pipeline(*args, **kwargs)

        @property
        def bad_images(self) -> int:
            return self.inner.bad_images

        def __iter__(self):
            for item in self.inner:
                if item[0] == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                    while True:
                        time.sleep(0.01)
                yield item

    monkeypatch.setattr(run, "train_batches", HangingPipeline)
    tick = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        run.main(run_args(data, tmp_path, "--steps", "5", "--no-evaluate"))
    assert info.value.code == 130 and time.perf_counter() - tick < 120
    assert _names(tmp_path / "checkpoints") == ["step_0000001.pt"]


def test_sigterm_stops_evaluation_at_once_after_the_weights_are_saved(data, tmp_path, monkeypatch):
    def hanging_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        while True:  # an evaluation that takes long: the signal must not wait for it
            time.sleep(0.01)

    monkeypatch.setattr(run, "evaluate", hanging_evaluation)
    with pytest.raises(SystemExit) as info:
        run.main(run_args(data, tmp_path, "--steps", "1"))
    assert info.value.code == 130
    assert (tmp_path / "pdf.safetensors").exists() and _names(tmp_path / "checkpoints") == ["step_0000001.pt"]


def test_second_signal_inside_a_step_stops_at_once_without_a_checkpoint_of_that_step(data, tmp_path, monkeypatch):
    original, calls = run.train_step, []

    def step_interrupted_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # deferred: the step would finish
            os.kill(os.getpid(), signal.SIGTERM)  # the second stops at once
            pytest.fail("the second signal did not interrupt the step")
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "train_step", step_interrupted_twice)
    with pytest.raises(SystemExit) as info:
        run.main(run_args(data, tmp_path, "--steps", "4", "--checkpoint-every", "1", "--no-evaluate"))
    assert info.value.code == 130 and len(calls) == 2
    assert _names(tmp_path / "checkpoints") == ["step_0000001.pt"]


def test_trim_drops_lines_that_are_not_utf8(tmp_path):  # issue 21, item 6
    path = tmp_path / "metrics.jsonl"
    lines = [metrics_log.json_line({"step": s}).encode() for s in (1, 2, 3)]
    path.write_bytes(lines[0] + b"\n" + b'{"step": 2, "loss": "\xff\xfe"}\n' + lines[2] + b"\n")
    metrics_log.trim(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1]
