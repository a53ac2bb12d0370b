"""Signals to the whole process group (issue 21, item 2): a terminal's Ctrl-C, Slurm and ``timeout`` signal
the trainer and its data-loader workers together; the run must still checkpoint and exit with 130."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdfkernels.train import checkpoint
from tests.train.helpers import run_args, shapes_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc (field 5 of stat is the group)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _steps_logged(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_checkpoints_and_exits_130(data, tmp_path, signum):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pdfkernels.train.run",
               *run_args(data, out, "--steps", "100000", "--num-workers", "2", "--no-evaluate")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)  # its own process group, as a job in a shell
    try:
        deadline = time.monotonic() + 240
        while len(_steps_logged(out / "metrics.jsonl")) < 2 and child.poll() is None:
            assert time.monotonic() < deadline, "the trainer logged no steps in time"
            time.sleep(0.2)
        assert child.poll() is None, child.communicate()[1][-2000:]
        workers = group_members(child.pid)
        assert len(workers) >= 3, f"expected the trainer and its 2 workers in the group, got {workers}"
        os.killpg(child.pid, signum)  # every process of the group, workers included
        _, err = child.communicate(timeout=240)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 130, err[-3000:]
    assert "DataLoader worker" not in err, err[-3000:]
    saved = checkpoint.latest(out / "checkpoints")
    assert saved is not None, "no checkpoint written on the signal"
    assert checkpoint.step_of(saved) == _steps_logged(out / "metrics.jsonl")[-1]  # the last step is kept
    left = group_members(child.pid)
    assert not left, f"processes of the run still alive: {left}"


@pytest.fixture
def signal_handlers_restored():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_a_signal_before_the_first_step_says_nothing_was_written(data, tmp_path, monkeypatch, caplog,
                                                                  signal_handlers_restored):
    import pdfkernels.train.run as run

    class HangingPipeline:  # loading step 0's batch never returns
        bad_images = 0

        def __init__(self, *args, **kwargs):
            pass

        def __iter__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            while True:
                time.sleep(0.01)
            yield

    monkeypatch.setattr(run, "train_batches", HangingPipeline)
    caplog.set_level("INFO", logger="pdf")
    with pytest.raises(SystemExit) as info:
        run.main(run_args(data, tmp_path, "--steps", "3", "--no-evaluate"))
    assert info.value.code == 130
    assert checkpoint.checkpoints(tmp_path / "checkpoints") == []
    assert "no step completed in this run: nothing written" in caplog.text
    assert "checkpointed" not in caplog.text
