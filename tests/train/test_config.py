"""The trainer's configuration: the paper's defaults, file and command-line overrides, switches, errors."""

import json

import pytest

from pdfkernels.train.config import TrainConfig, parse


def test_defaults_are_the_papers():
    c = TrainConfig(model="qwen2vl-2b")
    assert (c.num_paths, c.prefix_len, c.lambda_mim, c.lambda_con, c.temperature) == (2, 20, 1e-4, 1.0, 0.02)
    assert (c.lr, c.steps, c.warmup_steps, c.global_batch, c.lora_r) == (2e-5, 2000, 100, 1024, 8)
    assert TrainConfig().lora_r == 0  # the tiny preset trains every weight


def test_file_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 7, "lr": 0.5, "train_data": ["a.jsonl"]}))
    c = parse(["--config", str(path), "--lr", "0.25", "--no-mim"])
    assert (c.steps, c.lr, c.train_data, c.lambda_mim) == (7, 0.25, ["a.jsonl"], 0.0)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("steps: 9\ntemperature: 0.1\n")
    assert (parse(["--config", str(yaml_path)]).steps, parse(["--config", str(yaml_path)]).temperature) == (9, 0.1)


@pytest.mark.parametrize("flag,check", [
    ("--baseline", lambda c: (c.num_paths, c.prefix_len, c.lambda_mim) == (1, 0, 0.0)),
    ("--prefix-only", lambda c: (c.num_paths, c.prefix_len, c.lambda_mim) == (1, 20, 0.0)),
    ("--no-mim", lambda c: (c.num_paths, c.lambda_mim) == (2, 0.0)),
    ("--no-path-loss", lambda c: c.lambda_con == 0.0 and c.uses_mim),
])
def test_table3_switches(flag, check):
    assert check(parse([flag]))


def test_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'num_paths' expected >= 1"):
        TrainConfig(num_paths=0)
    with pytest.raises(ValueError, match="'bad_images' expected 'skip' or 'error'"):
        TrainConfig(bad_images="ignore")
    with pytest.raises(ValueError, match="'dtype' expected one of"):
        TrainConfig(dtype="fp16")
    with pytest.raises(ValueError, match="'max_length' expected >= 1, got 0"):
        TrainConfig(max_length=0)
    with pytest.raises(ValueError, match="'num_workers' expected >= 0, got -1"):
        TrainConfig(num_workers=-1)
    with pytest.raises(ValueError, match=r"'max_bad_fraction' expected in \(0, 1\], got 0"):
        TrainConfig(max_bad_fraction=0)
    with pytest.raises(ValueError, match="'bad_rows' expected one of"):
        TrainConfig(bad_rows="ignore")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="unknown fields"):
        parse(["--config", str(path)])
