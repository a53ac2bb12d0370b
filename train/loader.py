"""The training data pipeline: ``torch.utils.data`` worker processes decode the images of this rank's share
of each step's global batch and run the image processor; the training process assembles the chunks and
copies them to the device (pinned memory and non-blocking copies on CUDA) while the workers already
prepare the steps after it.

Item ``step`` of ``StepShares`` is rank r's positions ``[r * B/world, (r + 1) * B/world)`` of the step's plan
(``TrainSampler.plan``): every rank decodes only its share, and the union over ranks is the global batch
the single-process sampler draws. Bad images follow ``--bad-images``: ``error`` stops at the first, naming
the file; ``skip`` replaces the row (a replacement draw of its own per position) and counts it; the counts
of all workers are summed here, and the run stops when the bad fraction passes ``--max-bad-fraction`` or
one position finds no readable row in ``MAX_ATTEMPTS`` draws (a wrong ``--image-dir``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .data import BadImage, Collator, ImageLoader, TrainSampler, example, negatives

log = logging.getLogger("pdf.data")
MAX_ATTEMPTS = 64  # draws per position before a 'skip' run gives up on finding a readable row
MIN_LOADS_FOR_FRACTION = 32  # the bad fraction is judged once this many rows were tried


class BadData(RuntimeError):
    pass


def default_workers() -> int:
    """Half of this machine's CPUs shared by its ranks (torchrun's LOCAL_WORLD_SIZE), at most 8 per rank: the
    other half runs the training processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // 2 // ranks))


class StepShares(Dataset):
    """Item ``step``: this rank's share of the step, prepared in GradCache chunks of queries and targets (and,
    with ``hard_negatives`` > 0, of the queries' first so many hard negatives, query-major, a bad image in one
    of them replacing the whole row)."""

    def __init__(self, sampler: TrainSampler, loader: ImageLoader, collator: Collator, global_batch: int,
                 rank: int, world_size: int, chunk_size: int, policy: str = "skip", hard_negatives: int = 0):
        if global_batch % world_size:
            raise ValueError(f"config: 'global_batch' ({global_batch}) must divide by the {world_size} ranks")
        self.sampler, self.loader, self.collator = sampler, loader, collator
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.chunk_size, self.policy = chunk_size, policy
        self.hard_negatives = hard_negatives

    def _decode(self, row: dict):
        pair = example(row, self.loader)
        return (*pair, negatives(row, self.loader, self.hard_negatives)) if self.hard_negatives else pair

    def _row(self, step: int, position: int, row: dict, stats: dict):
        for attempt in range(MAX_ATTEMPTS + 1):
            stats["loads"] += 1
            try:
                return self._decode(row)
            except BadImage as exc:
                if self.policy == "error":
                    raise BadData(f"bad training image (run with --bad-images skip to skip it): {exc}") from None
                stats["bad"] += 1
                stats["first_bad"] = stats["first_bad"] or str(exc)
            row = self.sampler.replacement(step, position, attempt)
        raise BadData(f"step {step}: no readable training row in {MAX_ATTEMPTS} draws (last: "
                      f"{stats['first_bad']}); check --image-dir and the image paths of the data")

    def __getitem__(self, step: int) -> dict:
        share = self.global_batch // self.world_size
        first = self.rank * share
        plan = self.sampler.plan(step, self.global_batch)[first:first + share]
        stats = {"loads": 0, "bad": 0, "first_bad": ""}
        pairs = [self._row(step, first + i, row, stats) for i, row in enumerate(plan)]
        size = self.chunk_size
        item = {"step": step, **stats,
                "queries": [self.collator.prepare([p[0] for p in pairs[i:i + size]]) for i in range(0, share, size)],
                "targets": [self.collator.prepare([p[1] for p in pairs[i:i + size]]) for i in range(0, share, size)]}
        if self.hard_negatives:
            negs = [n for p in pairs for n in p[2]]
            item["negatives"] = [self.collator.prepare(negs[i:i + size]) for i in range(0, len(negs), size)]
        return item


class TrainBatches:
    """Iterates ``(step, query_chunks, target_chunks)`` from ``start`` to ``steps`` with inputs on ``device``
    (with hard negatives a fourth item: their chunks); ``bad_images`` and ``loads`` count over all workers."""

    def __init__(self, shares: StepShares, start: int, steps: int, device: torch.device, num_workers: int,
                 max_bad_fraction: float = 0.5):
        self.shares, self.device, self.max_bad_fraction = shares, torch.device(device), max_bad_fraction
        self.bad_images = self.loads = 0
        self.first_bad = ""
        cuda = self.device.type == "cuda"
        self.loader = DataLoader(shares, batch_size=None, sampler=range(start, steps), num_workers=num_workers,
                                 pin_memory=cuda, prefetch_factor=2 if num_workers else None,
                                 persistent_workers=False)

    def _to_device(self, prepared: dict) -> dict:
        inputs = self.shares.collator.assemble(prepared)
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    def _count(self, item: dict) -> None:
        self.bad_images += item["bad"]
        self.loads += item["loads"]
        self.first_bad = self.first_bad or item["first_bad"]
        if item["bad"]:
            log.warning("step %d: replaced %d rows with bad images (%d of %d rows tried so far; first: %s)",
                        item["step"], item["bad"], self.bad_images, self.loads, item["first_bad"])
        if self.loads >= MIN_LOADS_FOR_FRACTION and self.bad_images > self.max_bad_fraction * self.loads:
            raise BadData(f"{self.bad_images} of {self.loads} training rows had unreadable images, more than "
                          f"--max-bad-fraction {self.max_bad_fraction} (first: {self.first_bad}); check "
                          f"--image-dir")

    def __iter__(self) -> Iterator[tuple[int, list[dict], list[dict]]]:
        for item in self.loader:
            self._count(item)
            batch = (item["step"], [self._to_device(c) for c in item["queries"]],
                     [self._to_device(c) for c in item["targets"]])
            if "negatives" in item:
                batch += ([self._to_device(c) for c in item["negatives"]],)
            yield batch


def interruptible(items, should_stop: Callable[[], bool] | None):
    """Yields from ``items`` until ``should_stop()`` turns true (a signal arrived): then raises
    ``KeyboardInterrupt`` so that long loading or evaluation loops end promptly."""
    for item in items:
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt("stopped by a signal")
        yield item


def train_batches(config, collator: Collator, rank: int, world_size: int, start: int,
                  device: torch.device) -> TrainBatches:
    """The run's pipeline: every training row checked once (``--bad-rows``), then steps ``start..steps``."""
    from .rows import load_train_rows

    subsets = [load_train_rows(p, config.bad_rows, config.hard_negatives) for p in config.train_data]
    sampler = TrainSampler(subsets, config.subset_weights or None, config.seed)
    shares = StepShares(sampler, ImageLoader(config.image_dir), collator, config.global_batch, rank, world_size,
                        config.chunk_size, config.bad_images, config.hard_negatives)
    workers = default_workers() if config.num_workers is None else config.num_workers
    return TrainBatches(shares, start, config.steps, device, workers, config.max_bad_fraction)
