"""What a resume that replays batches pays: ``python scripts/replay_cost.py STEPS`` reads and discards the demo's
first STEPS steps (64 rows each) with this trainer's decoding (images, image processor, tokenizer; one process),
then prepares step STEPS directly, as this trainer's resume does (the plan is seeded by the step)."""

import sys
import tempfile
import time
from pathlib import Path

from pdfkernels.train import synthetic
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader, TrainSampler
from pdfkernels.train.loader import StepShares
from pdfkernels.train.model import build, make_collator
from pdfkernels.train.rows import load_train_rows


def main(steps: int) -> None:
    folder = Path(tempfile.mkdtemp())
    synthetic.generate(folder, num_train=2000, num_eval=10, seed=1234)
    config = TrainConfig(model="tiny", out_dir=str(folder / "out"))
    model, tokenizer, processor = build(config, synthetic.all_words(), "cpu")
    collator = make_collator(model, tokenizer, processor, 512)
    rows = [load_train_rows(str(folder / "train" / f"{task}.jsonl")) for task in ("t2i", "i2t")]
    shares = StepShares(TrainSampler(rows, None, 0), ImageLoader(str(folder / "images")), collator, 64, 0, 1, 64)
    start = time.perf_counter()
    for step in range(steps):
        shares[step]
    print(f"replaying {steps} steps of 64 rows (decoded, one process): {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    shares[steps]
    print(f"this trainer's resume: step {steps} prepared directly in {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]))
