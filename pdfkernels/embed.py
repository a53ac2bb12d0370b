"""Embed a corpus with an exported model (``python -m pdfkernels.export``), through the stock-transformers loader.

    python -m pdfkernels.embed --model EXPORT --data rows.jsonl [more.parquet ...] --image-dir DIR --out OUT
    torchrun --nproc-per-node G -m pdfkernels.embed ...            (shards split across the G ranks)

Rows in MMEB's formats (train/rows.py): eval rows (``qry_text``, ``qry_img_path``, ``tgt_text``, ``tgt_img_path``)
or training rows (``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``). Per file, each distinct query
and each distinct target (text + image path) is embedded once, queries first, as the trainer's evaluation
orders and batches them (train/evaluate.py ``unique_items``; same ``--batch-size``, same batches).

``OUT`` holds ``embed.json`` (the parameters; a rerun with other parameters is refused), ``items.jsonl`` (per
embedding: its ``id``, file, ``query``/``target``, text and image), ``rows.jsonl`` (per data row: file, line, the
ids of its query and targets) and the embeddings in shards of ``--shard-size`` items per file:
``shard-NNNNN.npy`` (``[n, d]``, ``--save-dtype`` float32 or float16; or ``.safetensors`` with ``embeddings``
and ``ids``) each completed by ``shard-NNNNN.json`` (ids, SHA-256 of the array file, items whose image failed
to decode: NaN rows). Shards are written to a temporary name and renamed, so a killed run keeps every
completed shard and a rerun encodes only the missing ones (identical files: one shard's batches never depend on
another's). ``--score`` also writes Precision@1 per MMEB eval file (positive = candidate 0; ties count against
it; ``precision_at_1``) to ``scores.json``. Bad rows (``--bad-rows``) and bad images (``--bad-images``): as
the trainer's flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pdfkernels import stock_loader
from pdfkernels.models.families import FAMILIES
from pdfkernels.train.checkpoint import file_sha256

log = logging.getLogger("pdf.embed")
PARAMETERS_FILE = "embed.json"
PARAMETERS = ("model", "data", "image_dir", "batch_size", "shard_size", "save_dtype", "format", "dtype",
            "max_length", "image_resolution", "num_frames", "video_fps", "bad_rows", "bad_images",
              "allow_outside_images")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EmbedError(ValueError):
    """The command cannot run as asked; the message names the argument or the file."""


@dataclass
class Part:
    """One data file: its distinct items (queries first) and, per kept row, (line, query index, target indices)."""

    path: str
    items: list[tuple[str, str, str]]  # (text, image path, video path), '' where the side has none
    kinds: list[str]
    rows: list[tuple[int, int, list[int]]]
    eval_format: bool
    ranked: bool = False  # rows with rel_scores: visual documents, ranked against every candidate of the file
    first_id: int = 0


def _row_items(row: dict) -> tuple[tuple[str, str, str], list[tuple[str, str, str]]]:
    """A checked row's query and candidates as the trainer's evaluation items (``train.evaluate.unique_items``)."""
    if "qry_text" in row:
        videos = row.get("tgt_video_path") or [""] * len(row["tgt_text"])
        return ((row["qry_text"], row["qry_img_path"], row.get("qry_video_path", "")),
                list(zip(row["tgt_text"], row["tgt_img_path"], videos)))
    return ((row["qry"], row["qry_image_path"], row.get("qry_video_path", "")),
            [(row["pos_text"], row["pos_image_path"], row.get("pos_video_path", ""))])


def read_part(path: str, args) -> tuple[Part, int]:
    """A data file's checked rows as a ``Part`` and the number of rows left out (``--bad-rows skip``: a malformed
    row; ``--bad-images skip``: images that their headers show to be bad, by the evaluation's rule
    ``candidates_to_drop``). An image that fails only when decoded leaves a NaN row in its shard (``failed``)."""
    from pdfkernels.train import images, video
    from pdfkernels.train.eval_data import candidates_to_drop, gains_of
    from pdfkernels.train.images import BadImage
    from pdfkernels.train.rows import BadRow, _where, check_eval_row, check_train_row, read_rows

    rows = read_rows(path)
    first = next((r for r in rows if isinstance(r, dict)), {})
    eval_format = "qry_text" in first
    check = check_eval_row if eval_format else check_train_row
    verdicts: dict[str, str | None] = {}  # image or video path -> why its header is bad, or None

    def problem_of(image: str, clip: str) -> str | None:
        path = clip or image
        if path and path not in verdicts:
            try:
                (video.check if clip else images.check)(args.image_dir, path, args.allow_outside_images)
                verdicts[path] = None
            except BadImage as exc:
                verdicts[path] = str(exc)
        return verdicts.get(path)

    queries: dict[tuple[str, str, str], int] = {}
    targets: dict[tuple[str, str, str], int] = {}
    kept, bad, bad_images, bad_negatives, ranked = [], 0, 0, 0, False
    for index, row in enumerate(rows):
        where = _where(path, index)
        try:
            if isinstance(row, BadRow):
                raise row
            checked = check(row, where)
            query, candidates = _row_items(checked)
            ranked = ranked or "rel_scores" in checked
        except BadRow as exc:
            if args.bad_rows == "error":
                raise BadRow(f"bad row (run with --bad-rows skip to leave such rows out): {exc}") from None
            if bad == 0:
                log.warning("%s: leaving out a bad row: %s", path, exc)
            bad += 1
            continue
        problems = [(i, why) for i, (_, image, clip) in enumerate([query, *candidates])
                    if (why := problem_of(image, clip))]
        if problems and args.bad_images == "error":
            raise BadImage(f"{where}: {problems[0][1]} (run with --bad-images skip to leave such rows out)")
        if problems:  # the evaluation's rule: the row goes when nothing is left to score, else its bad candidates
            dropped = candidates_to_drop({i for i, _ in problems}, gains_of(checked, len(candidates)))
            if dropped is None:
                if bad_images == 0:
                    log.warning("%s: leaving out a row with a bad image: %s: %s", path, where, problems[0][1])
                bad_images += 1
                continue
            candidates = [c for i, c in enumerate(candidates) if i not in dropped]
            bad_negatives += len(dropped)
        q = queries.setdefault(query, len(queries))
        kept.append((index + 1, q, [targets.setdefault(c, len(targets)) for c in candidates]))
    if bad_images or bad_negatives:
        log.warning("%s: %d rows of %d left out for bad images (nothing left to score), %d bad candidates dropped",
                    path, bad_images, len(rows), bad_negatives)
    if bad:
        log.warning("%s: %d bad rows of %d left out", path, bad, len(rows))
    if not kept:
        raise EmbedError(f"data file {path}: no usable row ({bad} bad)")
    offset = len(queries)
    part = Part(path, list(queries) + list(targets), ["query"] * len(queries) + ["target"] * len(targets),
                [(line, q, [offset + t for t in ts]) for line, q, ts in kept], eval_format, ranked)
    return part, bad + bad_images


class ShardBatches(Dataset):
    """Every batch of the shards this rank still has to write, in order: ``(shard, batch in shard, prepared)``."""

    def __init__(self, tasks: list[tuple[int, list[tuple[str, str]]]], loader, collator, batch_size: int, policy: str):
        from pdfkernels.train.evaluate import ItemBatches

        self.index = []
        self.batches = {}
        for shard, items in tasks:
            self.batches[shard] = ItemBatches(items, loader, collator, batch_size, policy)
            self.index += [(shard, i) for i in range(len(self.batches[shard]))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        shard, batch = self.index[i]
        return shard, batch, self.batches[shard][batch]


def shard_plan(parts: list[Part], shard_size: int) -> list[tuple[int, Part, int, int]]:
    """(shard number, its part, first and end index in the part) for every shard, per file in order."""
    plan, number = [], 0
    for part in parts:
        for start in range(0, len(part.items), shard_size):
            plan.append((number, part, start, min(start + shard_size, len(part.items))))
            number += 1
    return plan


def shard_names(out: Path, number: int, fmt: str) -> tuple[Path, Path]:
    return out / f"shard-{number:05d}.{fmt}", out / f"shard-{number:05d}.json"


def shard_done(out: Path, number: int, fmt: str) -> bool:
    """Whether a shard is complete: its record exists and the array file has the recorded SHA-256."""
    data, record = shard_names(out, number, fmt)
    try:
        return data.is_file() and json.loads(record.read_text())["sha256"] == file_sha256(data)
    except (OSError, ValueError, KeyError):
        return False


def write_shard(out: Path, number: int, ids: list[int], embeddings: torch.Tensor, failed: list[int], args) -> None:
    data, record = shard_names(out, number, args.format)
    tmp = data.with_name("." + data.name + ".tmp")
    values = embeddings.to(DTYPES[args.save_dtype]).cpu()
    if args.format == "npy":
        with open(tmp, "wb") as f:
            np.save(f, values.numpy())
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": values.contiguous(), "ids": torch.tensor(ids, dtype=torch.int64)}, str(tmp))
    os.replace(tmp, data)
    description = {"shard": number, "ids": [ids[0], ids[-1] + 1], "count": len(ids), "dim": int(values.shape[1]),
                   "dtype": args.save_dtype, "failed": failed, "sha256": file_sha256(data)}
    tmp_record = record.with_name("." + record.name + ".tmp")
    tmp_record.write_text(json.dumps(description) + "\n")
    os.replace(tmp_record, record)


def write_index(out: Path, parts: list[Part]) -> None:
    """``items.jsonl`` and ``rows.jsonl`` (rank 0, before any shard; atomic)."""
    items, rows = [], []
    for part in parts:
        for i, ((text, image, clip), kind) in enumerate(zip(part.items, part.kinds)):
            items.append({"id": part.first_id + i, "file": part.path, "kind": kind, "text": text, "image": image,
                          "video": clip})
        for line, q, targets in part.rows:
            rows.append({"file": part.path, "line": line, "query": part.first_id + q,
                         "targets": [part.first_id + t for t in targets]})
    for name, lines in (("items.jsonl", items), ("rows.jsonl", rows)):
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
        os.replace(tmp, out / name)


def export_digest(folder: Path) -> str:
    """SHA-256 over the export's description and its prefix (what a re-export changes; the backbone's weights,
    gigabytes, are not read)."""
    described = folder / stock_loader.EXPORT_FILE
    prefix = folder / json.loads(described.read_text())["prefix_file"]
    return hashlib.sha256((file_sha256(described) + file_sha256(prefix)).encode()).hexdigest()


def check_parameters(out: Path, parameters: dict, overwrite: bool) -> None:
    """Refuse an ``OUT`` holding another embedding run's shards; start it afresh with ``--overwrite``."""
    previous = out / PARAMETERS_FILE
    if previous.is_file() and not overwrite:
        saved = json.loads(previous.read_text())
        changed = [f"{k}: {saved.get(k)!r} -> {parameters[k]!r}" for k in parameters if saved.get(k) != parameters[k]]
        if changed:
            raise EmbedError(f"--out {out} holds embeddings made with other settings ({'; '.join(changed)}); use "
                             f"another --out or --overwrite")
    elif out.exists() and any(out.iterdir()) and not previous.is_file() and not overwrite:
        raise EmbedError(f"--out {out} is not empty and holds no {PARAMETERS_FILE}; use another --out or --overwrite")


def read_embeddings(out: str | Path) -> torch.Tensor:
    """All embeddings of a finished ``OUT`` as one ``[items, d]`` float32 tensor, rows in id order."""
    out = Path(out)
    parameters = json.loads((out / PARAMETERS_FILE).read_text())
    fmt = parameters["format"]
    records = sorted(out.glob("shard-*.json"))
    parts = []
    for record in records:
        data = record.with_suffix("." + fmt)
        if fmt == "npy":
            parts.append(torch.from_numpy(np.load(data)).float())
        else:
            from safetensors.torch import load_file

            parts.append(load_file(str(data))["embeddings"].float())
    return torch.cat(parts)


def precision_at_1(out: str | Path) -> dict[str, float]:
    """Precision@1 per MMEB eval file of a finished ``OUT`` (unit-normalised embeddings, candidate 0 the positive,
    a tie counts against it), as train/evaluate.py scores it: a row whose query or positive failed to decode is
    left out, a failed negative is no rival. Keyed by file stem (by path where two files share a stem)."""
    from pdfkernels.train.evaluate import hits

    out = Path(out)
    embeddings = F.normalize(read_embeddings(out), dim=-1)
    rows: dict[str, list[dict]] = {}
    for line in (out / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["file"], []).append(row)
    kinds = json.loads((out / PARAMETERS_FILE).read_text())["eval_files"]
    decoded = ~embeddings.isnan().any(1)
    stems = [Path(f).stem for f in rows if f in kinds]
    scores = {}
    for file, entries in rows.items():
        if file not in kinds:
            continue
        kept = [r for r in entries if decoded[r["query"]] and decoded[r["targets"][0]]]
        name = Path(file).stem if stems.count(Path(file).stem) == 1 else file
        if len(kept) < len(entries):
            log.warning("%s: %d of %d rows left out of the score (their query or positive failed to decode)",
                        file, len(entries) - len(kept), len(entries))
        if not kept:
            scores[name] = float("nan")
            continue
        targets = [[t for t in r["targets"] if decoded[t]] for r in kept]
        found = hits(embeddings[torch.tensor([r["query"] for r in kept])], embeddings.nan_to_num(0.0), targets)
        scores[name] = float(found.float().mean())
    return scores


def parse(argv: list[str] | None) -> argparse.Namespace:
    from pdfkernels.train.config import TrainConfig  # the trainer's video defaults

    parser = argparse.ArgumentParser(prog="python -m pdfkernels.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export folder (python -m pdfkernels.export)")
    parser.add_argument("--data", nargs="+", required=True, help="MMEB jsonl/parquet files")
    parser.add_argument("--image-dir", default=".", help="folder the rows' image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=64, help="items per forward (the trainer's "
                        "--eval-batch-size gives its evaluation's batches)")
    parser.add_argument("--shard-size", type=int, default=1024, help="items per shard file (a multiple of "
                        "--batch-size)")
    parser.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--format", choices=("npy", "safetensors"), default="npy")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype")
    parser.add_argument("--max-length", type=int, default=512, help="text tokens per item, as the trainer's")
    parser.add_argument("--image-resolution", type=int, default=0, help="resize images to S x S first (0: keep)")
    parser.add_argument("--num-frames", type=int, default=TrainConfig.num_frames, help="frames sampled per video")
    parser.add_argument("--video-fps", type=float, default=TrainConfig.video_fps,
                        help="> 0: a video file gives at most duration x fps frames")
    parser.add_argument("--bad-rows", choices=("error", "skip"), default="error")
    parser.add_argument("--bad-images", choices=("error", "skip"), default="skip")
    parser.add_argument("--allow-outside-images", action="store_true")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding processes (default: as the trainer)")
    parser.add_argument("--score", action="store_true", help="Precision@1 per eval file into scores.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an OUT holding other embeddings")
    args = parser.parse_args(argv)
    for name in ("batch_size", "shard_size", "max_length", "num_frames"):
        if getattr(args, name) < 1:
            raise EmbedError(f"--{name.replace('_', '-')} expected an int >= 1, got {getattr(args, name)}")
    for name in ("image_resolution", "num_workers", "video_fps"):
        if (getattr(args, name) or 0) < 0:
            raise EmbedError(f"--{name.replace('_', '-')} expected a value >= 0, got {getattr(args, name)}")
    if args.shard_size % args.batch_size:
        raise EmbedError(f"--shard-size expected a multiple of --batch-size ({args.batch_size}), got "
                         f"{args.shard_size}")
    if not (Path(args.model) / stock_loader.EXPORT_FILE).is_file():
        raise EmbedError(f"--model expected an export folder holding {stock_loader.EXPORT_FILE} (python -m "
                         f"pdfkernels.export), got {args.model}")
    return args


def run(args: argparse.Namespace) -> dict:
    """Embed every pending shard of this rank; returns counts and throughput."""
    from pdfkernels.train.data import ImageLoader
    from pdfkernels.train.loader import default_workers, ignore_signals, iterate
    from pdfkernels.train.model import image_processor, make_collator
    from pdfkernels.train.run import setup_distributed  # the trainer's: torchrun's variables, nccl or gloo

    rank, world, device = setup_distributed()
    out = Path(args.out)
    parts, bad_rows = [], 0
    for path in args.data:
        part, bad = read_part(path, args)
        parts.append(part)
        bad_rows += bad
    model_type = json.loads((Path(args.model) / "config.json").read_text())["model_type"]
    family = FAMILIES.get(model_type)
    if family is not None and not family.video and any(clip for part in parts for _, _, clip in part.items):
        reads = [f.title for f in FAMILIES.values() if f.video]
        raise EmbedError(f"--data holds video rows, which {family.title} does not read here (video rows: "
                         f"{', '.join(reads)} only); leave them out of --data")
    offset = 0
    for part in parts:
        part.first_id, offset = offset, offset + len(part.items)
    parameters = {k: getattr(args, k) for k in PARAMETERS}
    parameters["model_sha256"] = export_digest(Path(args.model))  # a re-export into the same folder is another model
    parameters.update(items=offset, eval_files=[p.path for p in parts if p.eval_format and not p.ranked])
    if args.score and any(p.ranked for p in parts):
        log.warning("--score: files with rel_scores (visual documents) are ranked against the whole subset by the "
                    "trainer (NDCG@5); their embeddings are written, Precision@1 is not computed for them")
    check_parameters(out, parameters, args.overwrite)  # on every rank: a refusal stops all, none waits at a barrier
    if dist.is_initialized():
        dist.barrier()  # every rank has read the old embed.json before rank 0 replaces it
    if rank == 0:
        if args.overwrite and out.exists():
            for stale in [*out.glob("shard-*"), *out.glob(".shard-*"), out / "scores.json"]:
                stale.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_index(out, parts)
        (out / PARAMETERS_FILE).write_text(json.dumps(parameters, indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()

    embedder = stock_loader.load(args.model, dtype=DTYPES[args.dtype], device=device)
    tokenizer = stock_loader.load_tokenizer(args.model)
    processor = image_processor(source=args.model, model_type=embedder.model.config.model_type)
    collator = make_collator(embedder.model, tokenizer, processor, args.max_length, args.image_resolution)
    plan = shard_plan(parts, args.shard_size)
    mine = [s for s in plan if s[0] % world == rank]
    pending = [s for s in mine if not shard_done(out, s[0], args.format)]
    if len(pending) < len(mine):
        log.info("rank %d: %d of its %d shards are complete already (kept)", rank, len(mine) - len(pending), len(mine))
    loader = ImageLoader(args.image_dir, args.allow_outside_images, args.num_frames, args.video_fps)
    batches = ShardBatches([(n, part.items[a:b]) for n, part, a, b in pending], loader, collator, args.batch_size,
                           args.bad_images)
    workers = default_workers() if args.num_workers is None else args.num_workers
    data = DataLoader(batches, batch_size=None, num_workers=workers if len(batches) > 1 else 0,
                      worker_init_fn=ignore_signals)
    by_number = {n: (part, a, b) for n, part, a, b in pending}
    current: dict[int, list] = {}
    failed: dict[int, list[int]] = {}
    encoded, start = 0, time.perf_counter()
    for shard, batch, item in tqdm(iterate(data), total=len(batches), desc=f"embed (rank {rank})",
                                   disable=rank != 0):
        part, a, b = by_number[shard]
        first = part.first_id + a + batch * args.batch_size
        size = min(args.batch_size, b - a - batch * args.batch_size)
        rows = torch.full((size, embedder.model.config.get_text_config().hidden_size), float("nan"))
        good = [j for j in range(size) if j not in item["bad"]]
        failed.setdefault(shard, []).extend(first + j for j in item["bad"])
        if item["prepared"] is not None:
            inputs = {k: v.to(device) for k, v in collator.assemble(item["prepared"]).items()}
            rows[good] = embedder.embed(inputs).float().cpu()
        current.setdefault(shard, []).append(rows)
        encoded += size
        if batch == len(batches.batches[shard]) - 1:  # the shard's last batch: write it
            ids = list(range(part.first_id + a, part.first_id + b))
            write_shard(out, shard, ids, torch.cat(current.pop(shard)), failed.pop(shard, []), args)
    seconds = time.perf_counter() - start
    if dist.is_initialized():
        dist.barrier()
    result = {"items": offset, "encoded": encoded, "seconds": seconds, "bad_rows": bad_rows,
              "items_per_s": encoded / seconds if seconds > 0 else float("nan")}
    if rank == 0:
        missing = [n for n, *_ in plan if not shard_done(out, n, args.format)]
        if missing:
            raise EmbedError(f"shards {missing[:5]} are missing after the run (another rank failed?); rerun to "
                             f"complete them")
        if encoded == offset and seconds > 0:  # every item in this run: the rows' rate is meaningful
            result["rows_per_s"] = sum(len(p.rows) for p in parts) / seconds
        if args.score:
            result["precision_at_1"] = precision_at_1(out)
            (out / "scores.json").write_text(json.dumps(result["precision_at_1"], indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    from pdfkernels.train.images import BadImage
    from pdfkernels.train.rows import BadRow

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse(argv)
        result = run(args)
    except (EmbedError, BadRow, BadImage, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"embedded {result['encoded']} of {result['items']} items in {result['seconds']:.1f} s on this rank: "
              f"{result['items_per_s']:.1f} items/s"
              + (f", {result['rows_per_s']:.1f} rows/s" if "rows_per_s" in result else "")
              + (f"; {result['bad_rows']} bad rows left out" if result["bad_rows"] else ""))
        for name, value in result.get("precision_at_1", {}).items():
            print(f"Precision@1 {name}: {100 * value:.1f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
