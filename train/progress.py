"""Progress of a run: a tqdm bar over the steps (rank 0) and, with ``--report-to``, the same metrics that
``metrics.jsonl`` holds sent to TensorBoard or Weights & Biases (checked at start: a missing package stops
the run before training)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from tqdm.auto import tqdm

from .metrics import progress_fields

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Progress:
    def __init__(self, config, start: int, rank: int):
        self.config, self.enabled = config, rank == 0
        self.bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not self.enabled,
                        dynamic_ncols=True)
        self.writer = self.run = None
        if self.enabled and config.report_to:
            self._open(config.report_to)

    def _open(self, kind: str) -> None:
        if importlib.util.find_spec(PACKAGES[kind]) is None:
            raise ValueError(f"config: 'report_to' {kind!r} needs the {PACKAGES[kind]} package, which is not "
                             f"installed (pip install {PACKAGES[kind]}), or leave --report-to unset")
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(self.config.out_dir) / "tensorboard"))
        else:
            import wandb

            self.run = wandb.init(project="pdf", dir=self.config.out_dir, config=dataclasses.asdict(self.config))

    def update(self, metrics: dict) -> None:
        """One finished step's metrics (``step`` counts from 1)."""
        if not self.enabled:
            return
        step = metrics["step"]
        self.bar.update(1)
        if step % self.config.log_every == 0 or step == self.config.steps:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", cos=f"{metrics['path_cosine']:.3f}",
                                 samples_s=f"{metrics['samples_per_s']:.1f}", refresh=False)
            # a line that stays in the log (the bar is overwritten): loss, the MIM diagnostics, speed
            self.bar.write(f"step {step}/{self.config.steps} loss {metrics['loss']:.4f} {progress_fields(metrics)} "
                           f"{metrics['samples_per_s']:.1f} samples/s")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
