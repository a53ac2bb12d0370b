"""The training data pipeline: ``torch.utils.data`` worker processes decode the images of this rank's share
of each step's global batch and run the image processor; the training process assembles the chunks and
copies them to the device (pinned memory and non-blocking copies on CUDA) while the workers already
prepare the steps after it.

Item ``step`` of ``StepShares`` is rank r's positions ``[r * B/world, (r + 1) * B/world)`` of the step's plan
(``TrainSampler.plan``): every rank decodes only its share, and the union over ranks is the global batch
the single-process sampler draws. Bad images follow ``--bad-images``: ``error`` stops at the first, naming
the file; ``skip`` replaces the row (a replacement draw of its own per position) and counts it; the counts
of all workers are summed here, and the run stops when the bad fraction passes ``--max-bad-fraction`` or
one position finds no readable row in ``MAX_ATTEMPTS`` draws (a wrong ``--image-dir``). An image that the
image processor refuses is a bad image too: when a chunk fails, its share is redone checking row by row.

Signals: a terminal's Ctrl-C, Slurm and ``timeout`` signal the whole process group, workers included. The
workers ignore SIGINT and SIGTERM (``iterate``), so that the training process alone decides how to stop
(train/signals.py: checkpoint, exit 130) and its next batch still arrives; it stops the workers itself when
it is done with them, killing any that does not exit (also at interpreter exit, where multiprocessing would
otherwise wait for a worker that ignores its SIGTERM)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .data import BadImage, Collator, ImageLoader, TrainSampler, example, negatives, refuse_unread_videos

log = logging.getLogger("pdf.data")
MAX_ATTEMPTS = 64  # draws per position before a 'skip' run gives up on finding a readable row
MIN_LOADS_FOR_FRACTION = 32  # the bad fraction is judged once this many rows were tried


class BadData(RuntimeError):
    pass


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LIVE: weakref.WeakSet = weakref.WeakSet()  # iterators whose workers are running


def ignore_signals(worker_id: int = 0) -> None:
    """``worker_init_fn``: this worker ignores SIGINT/SIGTERM (blocked since its fork, see ``iterate``)."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


@contextlib.contextmanager
def _signals_held():
    """SIGINT/SIGTERM blocked in this thread while workers are forked (a fork inherits the mask, so none
    reaches a worker before ``ignore_signals``); one that came meanwhile is delivered here afterwards."""
    can_block = hasattr(signal, "pthread_sigmask")  # POSIX
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if can_block else None
    try:
        yield
    finally:
        if can_block:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_workers(iterator) -> None:
    _LIVE.discard(iterator)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # torch's own: asks the workers to end, joins them, then sends SIGTERM (ignored)
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


@atexit.register  # registered after multiprocessing's exit hook, so it runs first
def _stop_all_workers() -> None:
    for iterator in list(_LIVE):
        _stop_workers(iterator)


def iterate(loader: Iterable) -> Iterator:
    """Items of a ``DataLoader`` built with ``worker_init_fn=ignore_signals``; its workers are stopped when
    the loop ends, however it ends."""
    with _signals_held():
        iterator = iter(loader)
    _LIVE.add(iterator)
    try:
        yield from iterator
    finally:
        _stop_workers(iterator)


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

    def _processable(self, item: tuple, row: dict) -> None:
        """``BadImage`` when the image processor refuses an image of ``item`` (query, target and any hard
        negatives, as ``_decode`` returns them) on its own."""
        sides = [(row.get("qry_video_path") or row["qry_image_path"], item[0]),
                 (row.get("pos_video_path") or row["pos_image_path"], item[1])]
        if len(item) > 2:
            sides += zip(row["neg_image_path"], item[2])
        for path, (text, img) in sides:
            if img is not None:
                try:
                    self.collator.prepare([(text, img)])
                except ValueError as exc:
                    raise BadImage(f"image {path}: the image processor refused it: {exc}") from exc

    def _row(self, step: int, position: int, row: dict, stats: dict, check: bool = False):
        for attempt in range(MAX_ATTEMPTS + 1):
            stats["loads"] += 1
            try:
                item = self._decode(row)
                if check:
                    self._processable(item, row)
                return item
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
        try:
            return self._share(step, plan, first, check=False)
        except ValueError:  # an image the processor refuses (found only now): the share again, row by row
            return self._share(step, plan, first, check=True)

    def _share(self, step: int, plan: list[dict], first: int, check: bool) -> dict:
        stats = {"loads": 0, "bad": 0, "first_bad": ""}
        pairs = [self._row(step, first + i, row, stats, check) for i, row in enumerate(plan)]
        size, share = self.chunk_size, len(plan)
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
                                 persistent_workers=False, worker_init_fn=ignore_signals)

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
        for item in iterate(self.loader):
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
    for path, rows in zip(config.train_data, subsets):
        refuse_unread_videos(collator, rows, path)
    sampler = TrainSampler(subsets, config.subset_weights or None, config.seed)
    images = ImageLoader(config.image_dir, config.allow_outside_images, config.num_frames, config.video_fps)
    shares = StepShares(sampler, images, collator, config.global_batch, rank, world_size,
                        config.chunk_size, config.bad_images, config.hard_negatives)
    workers = default_workers() if config.num_workers is None else config.num_workers
    return TrainBatches(shares, start, config.steps, device, workers, config.max_bad_fraction)
