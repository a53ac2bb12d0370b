"""The trainer's configuration: the paper's defaults, file and command-line overrides, switches, errors."""

import json
import sys

import pytest

import pdfkernels.train.run as run
from pdfkernels.models.families import PRESETS
from pdfkernels.train.config import SHIPPED, TrainConfig, parse


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


PAPER = sorted(p.stem for p in SHIPPED.glob("paper-*.yaml"))


def test_a_paper_config_per_backbone_keeps_the_papers_defaults():
    """One shipped config per paper backbone (Qwen2-VL 2B and 7B, LLaVA-1.6 7B; low and high resolution); each
    sets only the backbone, its learning rate (2e-5 for 2B, 5e-6 for 7B), resolution, chunk and folder."""
    assert {"paper-qwen2vl-2b", "paper-qwen2vl-7b", "paper-llava-next-7b"} <= set(PAPER)
    defaults = vars(TrainConfig(model="qwen2vl-2b"))
    for name in PAPER:
        config = parse(["--config", name])  # a shipped config by name, from any directory
        assert config.model in PRESETS and config.model != "tiny" and config.image_resolution > 0, name
        assert config.lr == (5e-6 if config.model.endswith("7b") else 2e-5), name
        changed = {k for k, v in vars(config).items() if v != defaults[k]}
        assert changed <= {"model", "lr", "image_resolution", "chunk_size", "out_dir"}, (name, changed)
    with pytest.raises(FileNotFoundError, match=r"--config: nope is neither a file nor a shipped configuration "
                       r"\['demo', 'paper-"):
        parse(["--config", "nope"])


def test_a_paper_config_without_data_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no 'train_data' given; the generated shapes set suits only the tiny "
                       "presets, not model 'qwen2vl-2b'"):
        run.main(["--config", "paper-qwen2vl-2b", "--out-dir", str(out)])
    assert not out.exists()


def test_a_bare_run_is_the_demo_and_says_so_first(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train/run.py"])
    seen = {}

    def parse_then_stop(argv):
        seen["config"] = parse(argv)
        raise SystemExit(0)

    monkeypatch.setattr(run, "parse", parse_then_stop)
    with pytest.raises(SystemExit):
        run.main()
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("train/run.py without arguments: running the built-in demo") and "demo.yaml" in first
    # what scripts/run.sh runs
    assert seen["config"] == parse(["--config", str(SHIPPED / "demo.yaml"), "--overwrite"])
    script = (SHIPPED.parents[1] / "scripts" / "run.sh").read_text()
    assert "-m pdfkernels.train.run --config train/configs/demo.yaml" in script and "replace=(--overwrite)" in script


def test_each_table3_switch_is_a_shipped_file_applied_last(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num_paths": 3, "lambda_mim": 0.5, "baseline": True}))  # a switch named in a file
    c = parse(["--config", str(path), "--prefix-len", "7"])
    assert (c.num_paths, c.prefix_len, c.lambda_mim) == (1, 0, 0.0)
    assert parse(["--config", "table3-no-path-loss"]) == parse(["--no-path-loss"])
    for switch in ("baseline", "prefix_only", "no_mim", "no_path_loss"):
        assert (SHIPPED / f"table3-{switch.replace('_', '-')}.yaml").is_file()


def test_a_checkpoint_saved_with_the_old_switch_fields_still_compares(tmp_path):
    from pdfkernels.train import resume

    saved = {**vars(parse(["--baseline"])), "baseline": True, "prefix_only": False, "no_mim": False}
    assert resume.compare(saved, parse(["--baseline"]), tmp_path) == []
    with pytest.raises(resume.ResumeError, match="num_paths: checkpoint 1, now 2"):
        resume.compare(saved, parse([]), tmp_path)


def test_a_resume_with_other_video_sampling_is_refused(tmp_path):
    from pdfkernels.train import resume

    saved = vars(parse([]))
    for flag, field in (("--num-frames", "num_frames"), ("--video-fps", "video_fps")):
        with pytest.raises(resume.ResumeError, match=rf"{field}: checkpoint"):
            resume.compare(saved, parse([flag, "3"]), tmp_path)
