"""PDF training, top to bottom.

    python -m pdfkernels.train.run [--config FILE.yaml] [--steps N --global-batch B ...]     (one process)
    python train/run.py ...                                                      (the same, from a checkout)
    torchrun --nproc-per-node G -m pdfkernels.train.run ...                                  (G processes, one per GPU)

With no arguments at all it runs the built-in demo (train/configs/demo.yaml into ./runs/demo, replaced each
time; what scripts/run.sh runs) and says so first. With no --train-data it trains on a generated MMEB-format
shapes set (train/synthetic.py). The paper's configs per backbone: train/configs/paper-*.yaml, for real data. Writes
``out_dir/metrics.jsonl`` (every loss term, the MI estimate, the cosine similarity between paths, lr,
samples/s per step), checkpoints ``out_dir/checkpoints/step_*.pt`` (atomic, verified, last k kept; ``--resume``
continues exactly), the PDF weights ``out_dir/pdf.safetensors`` and Precision@1 in ``out_dir/eval.{json,md}``.
On NaN, a reused folder, a changed resume, a damaged checkpoint, a signal or a full disk: docs/failures.md
(train/guards.py, outdir.py, resume.py, checkpoint.py, signals.py, metrics_log.py).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

if not __package__:  # `python train/run.py`: run this file as the module it is, from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import runpy

    runpy.run_module("pdfkernels.train.run", run_name="__main__", alter_sys=True)
    sys.exit()

import torch  # noqa: E402  (after the script bootstrap above)
import torch.distributed as dist  # noqa: E402

from pdfkernels import models  # noqa: E402

from . import checkpoint, guards, outdir, resume, signals, synthetic
from .config import SHIPPED, ConfigError, TrainConfig, parse
from .data import refuse_unread_videos
from .eval_data import check_eval_data
from .evaluate import evaluate, markdown
from .images import BadImage
from .loader import BadData, train_batches
from .metrics import RunDiagnostics
from .metrics_log import MetricsLog
from .model import build, make_collator
from .progress import Progress
from .rows import BadRow, load_eval_rows
from .step import Parts, train_step

log = logging.getLogger("pdf")


def setup_distributed() -> tuple[int, int, torch.device]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return rank, size, torch.device("cuda", torch.cuda.current_device())
    return rank, size, torch.device("cpu")


def default_data(config: TrainConfig, rank: int) -> None:
    """No data given: generate the shapes set once (rank 0) and train and evaluate on it."""
    folder = Path(config.out_dir) / "data"
    if rank == 0 and not (folder / "train" / "t2i.jsonl").exists():
        synthetic.generate(folder, num_train=2000, num_eval=100, seed=1234)
    if dist.is_initialized():
        dist.barrier()
    config.train_data = [str(folder / "train" / "t2i.jsonl"), str(folder / "train" / "i2t.jsonl")]
    config.eval_data = config.eval_data or [str(folder / "eval" / "t2i.jsonl"), str(folder / "eval" / "i2t.jsonl")]
    config.image_dir = config.image_dir or str(folder / "images")


def lr_schedule(config: TrainConfig):
    """Linear warm-up, then linear decay to zero at the last step."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))
    return factor


def make_parts(config: TrainConfig, model, device) -> Parts:
    hidden = models.patch.hf_model(model).config.text_config.hidden_size
    aggregator = models.Aggregator(hidden, config.num_paths).to(device) if config.num_paths > 1 else None
    estimator = models.VCLUB(hidden).to(device) if config.trains_estimator else None
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(aggregator.parameters()) if aggregator is not None else []
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    estimator_optimizer = torch.optim.AdamW(estimator.parameters(), lr=config.estimator_lr) if estimator else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    return Parts(model, aggregator, estimator, optimizer, estimator_optimizer, scheduler)


def demo_arguments() -> list[str]:
    """A bare ``python train/run.py``: the built-in demo, as scripts/run.sh runs it, announced in its first line."""
    demo = SHIPPED / "demo.yaml"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train/run.py without arguments: running the built-in demo ({demo}: PDF on a generated shapes set "
              f"with the tiny random Qwen2-VL, 400 steps of 64, about 2 minutes on 2 CPU cores; output in "
              f"{Path('runs/demo').resolve()}, replaced on each bare run). The paper's configs for real data: "
              f"--config {SHIPPED}/paper-qwen2vl-2b.yaml --model DIR --train-data ... (docs/training.md).",
              flush=True)
    return ["--config", str(demo), "--overwrite"]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    config = parse(argv if argv else demo_arguments())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not config.train_data and not config.model.startswith("tiny"):
        raise ValueError(f"config: no 'train_data' given; the generated shapes set suits only the tiny presets, not "
                         f"model {config.model!r}: pass MMEB training files with --train-data (docs/training.md)")
    rank, world_size, device = setup_distributed()
    if config.global_batch % world_size:
        raise ValueError(f"config: 'global_batch' ({config.global_batch}) must divide by the {world_size} ranks")
    run_id = outdir.prepare(config, rank)  # before anything is written: refuses a folder holding another run
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if not config.train_data:
        default_data(config, rank)
    if config.evaluate:  # a missing or malformed eval file or image stops now, not after the training
        check_eval_data(config)

    # model, data, optimisation
    model, tokenizer, processor = build(config, synthetic.all_words(), device)
    collator = make_collator(model, tokenizer, processor, config.max_length, config.image_resolution)
    if config.evaluate and not collator.reads_video:  # video eval rows stop now, not after the training
        for path in config.eval_data:
            refuse_unread_videos(collator, load_eval_rows(path), path)
    parts = make_parts(config, model, device)
    out = Path(config.out_dir)
    ckpt_dir = out / "checkpoints"
    start = resume.resume(ckpt_dir, parts, config, rank) if config.resume else 0

    def save(step: int) -> None:  # never a non-finite state (checked on every rank, so all stop together)
        guards.check_state(parts, step)
        if rank == 0:  # a failed write raises; earlier checkpoints stay intact
            checkpoint.save(ckpt_dir, step, parts, config, config.keep_checkpoints, run_id)
        saved.append(step)

    # signals: see train/signals.py (deferred inside a step, at once in data loading and evaluation)
    guard = signals.SignalGuard()
    gradients = guards.GradientGuard(parts)  # a non-finite gradient skips the update and stops the run
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    pipeline = train_batches(config, collator, rank, world_size, start, device)  # this rank's share, prefetched
    batches = iter(pipeline)
    metrics_log = MetricsLog(out / "metrics.jsonl", start) if rank == 0 else None
    progress = Progress(config, start, rank)
    history, saved = [], [start]
    diagnostics = RunDiagnostics(config, model)
    step = done = start  # done: steps completed so far
    try:
        tick = time.perf_counter()
        while True:
            try:
                with guard.interruptible():
                    item = next(batches, None)
            except signals.Interrupted as stop:
                wrote = saved[-1] < done
                if wrote:
                    save(done)
                log.info("stopping on %s while loading a batch (%s)", signal.Signals(stop.signum).name,
                         signals.saved_message(done, start, wrote))
                sys.exit(130)
            if item is None:
                break
            step, query_chunks, target_chunks, *negative_chunks = item  # a fourth item: hard negatives' chunks
            metrics = train_step(parts, query_chunks, target_chunks, config, device, *negative_chunks)
            metrics.update(step=step + 1, samples_per_s=config.global_batch / (time.perf_counter() - tick),
                           bad_images=pipeline.bad_images, truncated_rows=collator.truncated)
            tick, done = time.perf_counter(), step + 1
            history.append(metrics)
            if metrics_log is not None:
                diagnostics.update(metrics)
                metrics_log.write(metrics)
            progress.update(metrics)
            guards.check_step(metrics, step + 1, gradients.bad)
            early = config.stop_after and step + 1 - start >= config.stop_after and step + 1 < config.steps
            if (step + 1) % config.checkpoint_every == 0 or guard.requested or early:
                save(step + 1)
            if guard.requested:
                log.info("stopping on a signal after step %d (checkpoint written)", step + 1)
                sys.exit(130)
            if early:
                log.info("stopping after %d steps of this run (checkpoint written; --resume continues)",
                         config.stop_after)
                return {"history": history, "eval": {}}
        if saved[-1] < config.steps:
            save(config.steps)
        if rank == 0:
            models.save_pdf(out / "pdf.safetensors", model, parts.aggregator, parts.estimator)
        results = {}
        if config.evaluate and config.eval_data:  # every rank encodes its share
            with guard.interruptible():  # weights are saved: a signal may stop evaluation at once
                results = evaluate(model, collator, config, parts.aggregator, device, out)
            if rank == 0:
                print(markdown(results))
    except signals.Interrupted as stop:  # a second signal inside a step, or one during evaluation
        log.warning("stopping at once on %s; newest checkpoint: step %d", signal.Signals(stop.signum).name,
                    saved[-1])
        sys.exit(130)
    finally:
        guard.restore()
        progress.close()
        if metrics_log is not None:
            metrics_log.close()
        outdir.release(out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"history": history, "eval": results}


def cli(argv: list[str] | None = None) -> int:
    """The command line: a failure the trainer detected is one line on stderr and exit status 1."""
    try:
        main(argv)
    except (ConfigError, BadRow, BadImage, BadData, guards.NonFiniteError, checkpoint.CheckpointError,
            resume.ResumeError, outdir.OutDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
