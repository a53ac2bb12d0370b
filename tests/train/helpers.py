"""Small shared set-up for trainer tests: a generated shapes set (once per session) and run arguments."""

from __future__ import annotations

from pathlib import Path

from pdfkernels.train import synthetic

_DATA: dict = {}


def shapes_data(tmp_root: Path) -> Path:
    if "path" not in _DATA:
        _DATA["path"] = synthetic.generate(tmp_root / "shapes", num_train=60, num_eval=8, seed=3)
    return _DATA["path"]


def shapes_data_with_negatives(tmp_root: Path) -> Path:
    """The shapes set with two hard negatives per training row."""
    if "negatives" not in _DATA:
        _DATA["negatives"] = synthetic.generate(tmp_root / "shapes-negatives", num_train=60, num_eval=8, seed=3,
                                                hard_negatives=2)
    return _DATA["negatives"]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--train-data", str(data / "train" / "t2i.jsonl"), str(data / "train" / "i2t.jsonl"),
            "--eval-data", str(data / "eval" / "t2i.jsonl"), str(data / "eval" / "i2t.jsonl"),
            "--image-dir", str(data / "images"), "--out-dir", str(out), "--global-batch", "8", "--chunk-size", "4",
            "--lr", "1e-3", "--warmup-steps", "1", "--temperature", "0.1", "--prefix-len", "3",
            "--checkpoint-every", "100", "--log-every", "100", *extra]


# the keys of an eval.json subset (counts aside): Hit@1 per mode under the mode's name, its ranking metrics
EVAL_KEYS = {"chance"} | {f"{mode}{metric}" for mode in ("single", "aggregate", "none")
                          for metric in ("", " ndcg@5", " recall@1", " recall@5", " recall@10")}
