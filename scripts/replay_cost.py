"""Replay cost proxy (python scripts/replay_cost.py STEPS): what reading and discarding the first 1,000 steps of the demo (64 rows a step) costs with
this trainer's decoding (images, image processor, tokenizer), i.e. what a resume that replays batches pays;
our own resume reads none (the plan is seeded by the step)."""
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

steps = int(sys.argv[1])
d = Path(tempfile.mkdtemp())
synthetic.generate(d, num_train=2000, num_eval=10, seed=1234)
cfg = TrainConfig(model="tiny", out_dir=str(d / "o"))
model, tok, proc = build(cfg, synthetic.all_words(), "cpu")
col = make_collator(model, tok, proc, 512)
rows = [load_train_rows(str(d / "train" / f"{t}.jsonl")) for t in ("t2i", "i2t")]
shares = StepShares(TrainSampler(rows, None, 0), ImageLoader(str(d / "images")), col, 64, 0, 1, 64)
t = time.perf_counter()
for s in range(steps):
    shares[s]
print(f"replaying {steps} steps of 64 rows (decode + processor + tokenizer, 1 process): {time.perf_counter() - t:.1f} s")
t = time.perf_counter(); shares[steps]; print(f"our resume: step {steps} prepared directly in {time.perf_counter() - t:.3f} s")
