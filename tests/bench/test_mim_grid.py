"""The MIM grid's plumbing without training: its run arguments parse into the intended configs, processes
share runs through claims, and the report's figures follow from the run folders."""

import json
import os
import subprocess
import sys

import pytest

from pdfkernels.bench import mim_grid, mim_grid_report
from pdfkernels.train.config import TrainConfig, parse


def test_run_arguments_make_the_intended_config(tmp_path):
    data = TrainConfig(train_data=["a.jsonl", "b.jsonl"], eval_data=["e.jsonl"], image_dir="img")
    probe = parse(mim_grid.train_args(0.0, 5, 2, 40, data, tmp_path))
    assert (probe.lambda_mim, probe.estimator_steps, probe.seed, probe.steps) == (0.0, 5, 2, 40)
    assert probe.track_mi and probe.trains_estimator and not probe.uses_mim
    assert (probe.train_data, probe.eval_data, probe.image_dir) == (["a.jsonl", "b.jsonl"], ["e.jsonl"], "img")
    assert (probe.global_batch, probe.lr, probe.temperature) == (64, 1e-3, 0.1)  # the demo config's
    mim = parse(mim_grid.train_args(1e-2, 1, 0, 40, data, tmp_path))
    assert (mim.lambda_mim, mim.track_mi, mim.uses_mim) == (1e-2, False, True)


def test_a_live_claim_is_respected_and_a_dead_one_taken_over(tmp_path):
    run = tmp_path / "lam1_k1_seed0"
    assert mim_grid.claim(run) and (run / "claim").read_text() == str(os.getpid())
    assert not mim_grid.claim(run)  # held by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "claim").write_text(dead.stdout.strip())
    assert mim_grid.claim(run) and (run / "claim").read_text() == str(os.getpid())


def _fake_run(runs, name, p1, path_cos, mi):
    folder = runs / name
    folder.mkdir(parents=True)
    steps = [{"step": i + 1, "path_cosine": c, "prefix_cosine": 0.1 * c, "prefix_update_cosine": 0.5,
              "mi_estimate": m, "loss_estimator": 10.0, "emb_norm_0": 2.0, "emb_norm_1": 4.0}
             for i, (c, m) in enumerate(zip(path_cos, mi))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (folder / "eval.json").write_text(json.dumps({"average": {"single": p1, "aggregate": p1, "none": 0.1,
                                                              "chance": 0.1}}))


def test_report_figures_follow_from_the_runs(tmp_path):
    runs = tmp_path / "runs"
    cosines = [0.5] * 18 + [0.9, 0.7]  # 20 steps: the last tenth is the last 2
    _fake_run(runs, "lam1_k5_seed0", 0.8, cosines, [1.0] * 16 + [-1.0] * 4)
    _fake_run(runs, "lam1_k5_seed1", 0.6, cosines, [-2.0] * 20)
    (runs / "lam1_k5_seed2").mkdir()  # unfinished: no eval.json, left out
    mim_grid_report.main(["--runs", str(runs), "--results", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["seed"] for r in summary] == [0, 1]
    first = summary[0]
    assert first["path_cosine"] == pytest.approx(0.8) and first["path_cosine_min"] == 0.5
    assert first["mi_negative_share"] == pytest.approx(0.2) and first["emb_norm"] == pytest.approx(3.0)
    assert (first["mi_negative_run"], summary[1]["mi_negative_run"]) == (4, 20)
    (row,) = [line for line in (tmp_path / "out" / "table.md").read_text().splitlines() if line.startswith("| 1 ")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["1", "5", "2", "70.0 (60 – 80)"]
    assert cells[12:14] == ["60%", "12"]  # steps with MI < 0: (20% + 100%) / 2; longest run (4 + 20) / 2
