"""Does MIM diversify the paths? The demo trained over lambda_MIM x estimator steps x seeds at one budget.

    python -m pdfkernels.bench.mim_grid [--steps 150] [--lambdas 0 1e-4 1e-2 1] [--estimator-steps 1 5]
                                        [--seeds 0 1 2] [--runs /tmp/mim-grid] [--results bench/results/mim-grid]

Each setting is one ``pdfkernels.train.run`` process on ``train/configs/demo.yaml`` with ``--steps``
overriding its 400 (the warm-up and linear decay follow). lambda_MIM = 0 runs with ``--track-mi``: the
estimator is trained as a probe with the same K, so those rows show what the MI estimate reads when nothing
pushes against it. Runs go seed by seed (every setting of seed 0 first), so a partial grid is already usable,
and a run whose ``eval.json`` exists is skipped, so the command resumes; two processes on one ``--runs``
folder split the runs between them. All runs share one generated shapes
set; each runs with ``--threads`` torch threads (default one: on a shared CPU two threads per process
spin against the other load, 20x slower here). At the end ``mim_grid_report`` writes the table and the
plot into ``--results``. Not part of CI.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from pdfkernels.train.config import TrainConfig
from pdfkernels.train.run import default_data

from . import mim_grid_report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "train" / "configs" / "demo.yaml"


def run_name(lambda_mim: float, estimator_steps: int, seed: int) -> str:
    return f"lam{lambda_mim:g}_k{estimator_steps}_seed{seed}"


def train_args(lambda_mim: float, estimator_steps: int, seed: int, steps: int, data: TrainConfig,
               out_dir: Path) -> list[str]:
    args = ["--config", str(DEMO), "--steps", str(steps), "--seed", str(seed), "--lambda-mim", f"{lambda_mim:g}",
            "--estimator-steps", str(estimator_steps), "--out-dir", str(out_dir), "--log-every", "25",
            "--checkpoint-every", str(steps), "--keep-checkpoints", "1",
            "--train-data", *data.train_data, "--eval-data", *data.eval_data, "--image-dir", data.image_dir]
    return args + (["--track-mi"] if lambda_mim == 0 else [])


def claim(out: Path) -> bool:
    """Take a run for this process unless another live grid process holds it: several ``mim_grid`` processes
    on one ``--runs`` folder share the work."""
    out.mkdir(parents=True, exist_ok=True)
    holder = out / "claim"
    try:
        fd = os.open(holder, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(holder.read_text() or 0), 0)
            return False  # its holder is alive
        except PermissionError:
            return False  # alive, another user's
        except (ProcessLookupError, ValueError):
            holder.unlink(missing_ok=True)  # a dead holder's run starts over
            return claim(out)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-4, 1e-2, 1.0])
    parser.add_argument("--estimator-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (one avoids spinning threads on a shared CPU)")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/mim-grid"), help="run folders (large)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "mim-grid",
                        help="table, plot and summary (small, committed)")
    args = parser.parse_args(argv)

    data = TrainConfig(out_dir=str(args.runs))
    default_data(data, rank=0)  # the demo's generated shapes set, once for every run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads)}
    for seed, lam, k in itertools.product(args.seeds, args.lambdas, args.estimator_steps):
        out = args.runs / run_name(lam, k, seed)
        if (out / "eval.json").exists() or not claim(out):
            continue
        if (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # an interrupted run starts over rather than appending
        tick = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            subprocess.run([sys.executable, "-m", "pdfkernels.train.run",
                            *train_args(lam, k, seed, args.steps, data, out)],
                           stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
        print(f"{out.name}: {time.perf_counter() - tick:.0f} s", flush=True)
    mim_grid_report.main(["--runs", str(args.runs), "--results", str(args.results)])


if __name__ == "__main__":
    main()
