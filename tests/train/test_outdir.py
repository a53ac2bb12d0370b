"""One trainer per output folder (issue 21, item 4) and an unreadable run.json (item 6)."""

import os
import signal
import subprocess
import sys
import time

import pytest

import pdfkernels.train.run as run
from pdfkernels.train import checkpoint, outdir
from tests.train.helpers import run_args, shapes_data
from tests.train.test_signals import ROOT, _steps_logged


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


def test_a_second_trainer_is_refused_naming_the_live_one_and_takes_over_once_it_is_killed(data, tmp_path):
    out = tmp_path / "run"
    run.main(run_args(data, out, "--steps", "3", "--stop-after", "1", "--no-evaluate", "--num-workers", "0"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    live = subprocess.Popen([sys.executable, "-m", "pdfkernels.train.run",
                             *run_args(data, out, "--steps", "100000", "--resume", "--no-evaluate", "--num-workers",
                                       "0")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_steps_logged(out / "metrics.jsonl")) < 3 and live.poll() is None:
            assert time.monotonic() < deadline, "the live trainer logged no steps in time"
            time.sleep(0.2)
        assert live.poll() is None, live.communicate()[1][-2000:]
        for flag in ("--resume", "--overwrite"):
            with pytest.raises(outdir.OutDirError, match=rf"in use by another trainer \(pid {live.pid} "):
                run.main(run_args(data, out, "--steps", "3", flag, "--no-evaluate", "--num-workers", "0"))
        assert (out / "metrics.jsonl").exists() and checkpoint.checkpoints(out / "checkpoints")
    finally:
        os.killpg(live.pid, signal.SIGKILL)  # kill -9: no clean-up, the lock file stays behind
        live.wait()
    assert (out / outdir.LOCK_FILE).read_text().startswith(f"pid {live.pid} ")
    steps = _steps_logged(out / "metrics.jsonl")
    history = run.main(run_args(data, out, "--steps", "100000", "--resume", "--stop-after", "1", "--no-evaluate",
                                "--num-workers", "0"))["history"]
    assert [m["step"] for m in history] == [2]  # resumed from the last checkpoint (step 1), not refused
    assert _steps_logged(out / "metrics.jsonl") == [1, 2] and len(steps) >= 3


@pytest.mark.parametrize("content", ['{"run": ', "[1, 2]", '{"other": 1}', "\xff\xfe"],
                         ids=["torn", "list", "no-run", "not-utf8"])
def test_an_unreadable_run_json_is_a_clear_refusal(data, tmp_path, content):
    run.main(run_args(data, tmp_path, "--steps", "2", "--stop-after", "1", "--no-evaluate", "--num-workers", "0"))
    (tmp_path / outdir.RUN_FILE).write_bytes(content.encode("latin-1"))
    with pytest.raises(outdir.OutDirError, match=r"run.json (is unreadable|names no run).*--overwrite"):
        run.main(run_args(data, tmp_path, "--steps", "2", "--resume", "--no-evaluate", "--num-workers", "0"))


def _free(out) -> bool:
    """Whether another open file description can take the folder's lock now (flock: even in this process)."""
    import fcntl

    fd = os.open(out / outdir.LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_lock_is_held_while_preparing_and_given_up_when_refused_or_done(data, tmp_path):
    from pdfkernels.train.config import TrainConfig

    outdir.lock(tmp_path)
    assert not _free(tmp_path)
    outdir.release(tmp_path)
    assert _free(tmp_path)
    run.main(run_args(data, tmp_path, "--steps", "1", "--no-evaluate", "--num-workers", "0"))
    assert _free(tmp_path)  # released at the end of the run
    with pytest.raises(outdir.OutDirError, match="holds an earlier run"):
        outdir.prepare(TrainConfig(out_dir=str(tmp_path)), rank=0)
    assert _free(tmp_path)  # a refused run leaves the folder free
