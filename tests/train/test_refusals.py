"""Late or unclear errors made early and clear (issue 21, item 6): nonsense settings refused by the config,
eval files checked before training, ``--track-mi`` added on resume."""

import json

import pytest

import pdfkernels.train.run as run
from pdfkernels.train import checkpoint
from pdfkernels.train.config import parse
from pdfkernels.train.rows import BadRow
from tests.train.helpers import run_args, shapes_data


@pytest.fixture
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("argv,message", [
    (["--lambda-mim", "-1"], r"'lambda_mim' expected >= 0"),
    (["--lambda-con", "-0.5"], r"'lambda_con' expected >= 0"),
    (["--lambda-mim", "nan"], r"'lambda_mim' expected >= 0"),
    (["--num-paths", "1"], r"'lambda_mim' \(0.0001\) needs 'num_paths' >= 2"),
    (["--num-paths", "1", "--lambda-mim", "0", "--track-mi"], r"'track_mi' needs 'num_paths' >= 2"),
    (["--prefix-len", "0"], r"'num_paths' 2 needs 'prefix_len' >= 1"),
    (["--prefix-len", "-1"], r"'prefix_len' expected >= 0"),
    (["--train-data", "a", "b", "--subset-weights", "1", "-1"], r"'subset_weights' expected finite weights >= 0"),
    (["--train-data", "a", "b", "--subset-weights", "0", "0"], r"'subset_weights' expected .* positive sum"),
    (["--train-data", "a", "--subset-weights", "inf"], r"'subset_weights' expected finite"),
    (["--seed", str(10 ** 14)], r"'seed' expected an integer in \[0, 2\*\*32\)"),
    (["--seed", "-1"], r"'seed' expected an integer"),
], ids=["lambda-mim", "lambda-con", "lambda-nan", "one-path-mim", "one-path-track-mi", "no-prefix-two-paths",
        "negative-prefix", "negative-weight", "zero-weights", "inf-weight", "seed-1e14", "negative-seed"])
def test_nonsense_settings_are_refused_before_the_start(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_sensible_one_path_settings_still_parse():
    assert parse(["--prefix-only"]).num_paths == 1
    assert parse(["--baseline"]).prefix_len == 0
    assert parse(["--num-paths", "1", "--lambda-mim", "0"]).lambda_mim == 0
    assert parse(["--seed", str(2 ** 32 - 1)]).seed == 2 ** 32 - 1


def test_a_float_seed_from_a_config_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"seed": 1e14}))
    with pytest.raises(ValueError, match=r"'seed' expected an integer .* got 100000000000000.0"):
        parse(["--config", str(path)])


@pytest.mark.parametrize("problem", ["missing", "malformed"])
def test_eval_files_are_checked_before_training(data, tmp_path, problem, monkeypatch):
    bad = tmp_path / "eval.jsonl"
    if problem == "malformed":
        bad.write_text(json.dumps({"qry_text": "a", "tgt_text": "not a list"}) + "\n")
    steps = []
    monkeypatch.setattr(run, "train_step", lambda *a, **k: steps.append(1) or {})
    args = run_args(data, tmp_path / "run", "--steps", "2")
    args[args.index("--eval-data") + 1:args.index("--eval-data") + 3] = [str(bad)]
    with pytest.raises((FileNotFoundError, BadRow), match=r"eval.jsonl"):
        run.main(args)
    assert steps == [], "training ran before the eval files were checked"


def test_track_mi_added_on_resume_starts_a_fresh_estimator(data, tmp_path, caplog):
    base = ("--steps", "3", "--no-evaluate", "--num-workers", "0", "--lambda-mim", "0")
    run.main(run_args(data, tmp_path, *base, "--stop-after", "1"))
    caplog.set_level("WARNING", logger="pdf")
    history = run.main(run_args(data, tmp_path, *base, "--resume", "--track-mi"))["history"]
    assert [m["step"] for m in history] == [2, 3] and all("mi_estimate" in m for m in history)
    assert "holds no vCLUB estimator" in caplog.text
    assert checkpoint.read(checkpoint.latest(tmp_path / "checkpoints"))["estimator"] is not None


def test_the_command_line_says_a_refused_setting_in_one_line(capsys):
    assert run.cli(["--seed", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: config: 'seed' expected an integer") and "Traceback" not in err
