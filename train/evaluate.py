"""MMEB-eval Precision@1: each query ranks its candidates (the positive is candidate 0) by cosine similarity.

At MMEB scale (1000 queries, 1000 candidates each from a shared pool) each distinct query and each distinct
candidate (by text and image path) is encoded once, in batches, the image decoding and processing in
data-loader workers; when distributed, every rank encodes a contiguous share and the embeddings are
gathered. Scores are one matrix product per subset. A query counts as a hit only when its positive scores
strictly above every other candidate (ties go against it, so degenerate all-equal embeddings score 0), and
non-finite embeddings stop the evaluation.

Bad images: the start check (train/eval_data.py) has dropped what their headers show; an image that still
fails when decoded (damaged pixel data) or that the image processor refuses stops the evaluation with
``--bad-images error``; with ``skip`` it is left out the same way (a row losing its query or positive is
dropped, a negative leaves its row's candidates) and counted.

Modes (the paper's Table 3 rows R5-R7): ``single`` (path 0, the deployed embedding), ``aggregate`` (all
paths and the aggregator), ``none`` (no prefix: the plain backbone). ``single`` and ``aggregate`` come from
the same N-path forward (path 0 of it is the single-path embedding)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pdfkernels import models

from .data import BadImage, Collator, ImageLoader, refuse_unread_videos
from .eval_data import candidates_to_drop, gains_of, load_eval_subset
from .loader import default_workers, ignore_signals, interruptible, iterate
from .losses import world
from .precision import autocast
from .ranking import ranking_metrics

Item = tuple[str, str, str]  # (text, image path or "", video path or "")
COUNTS = ("dropped_rows", "dropped_candidates")  # per subset in eval.json: what --bad-images skip left out
log = logging.getLogger("pdf.eval")


def unique_items(rows: list[dict]) -> tuple[list[Item], list[Item], list[int], list[list[int]]]:
    """(distinct queries, distinct candidates, each row's query index, each row's candidate indices)."""
    queries: dict[Item, int] = {}
    candidates: dict[Item, int] = {}
    query_of = [queries.setdefault((r["qry_text"], r["qry_img_path"], r.get("qry_video_path", "")), len(queries))
                for r in rows]
    cands_of = [[candidates.setdefault(c, len(candidates)) for c in
                 zip(r["tgt_text"], r["tgt_img_path"], r.get("tgt_video_path") or [""] * len(r["tgt_text"]))]
                for r in rows]
    return list(queries), list(candidates), query_of, cands_of


class ItemBatches(Dataset):
    """Batch i of ``items``: images decoded and the collator's ``prepare`` run (in a worker). Returns
    ``{"prepared": ..., "bad": {position in the batch: why}}``; a bad image raises with ``policy`` error."""

    def __init__(self, items: list[Item], loader: ImageLoader, collator: Collator, batch_size: int,
                 policy: str = "skip"):
        self.items, self.loader, self.collator, self.batch_size = items, loader, collator, batch_size
        self.policy = policy

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        chunk = self.items[i * self.batch_size:(i + 1) * self.batch_size]
        try:
            return {"prepared": self.collator.prepare([(text, self.loader.visual(*paths)) for text, *paths in chunk]),
                    "bad": {}}
        except (BadImage, ValueError):
            pass
        good, bad = [], {}  # found only now (rare): the batch again, item by item, to name the image
        for j, (text, *paths) in enumerate(chunk):
            path = "".join(paths)  # the side's image or video
            try:
                pair = (text, self.loader.visual(*paths))
                self.collator.prepare([pair])
                good.append(pair)
            except BadImage as exc:
                bad[j] = str(exc)
            except ValueError as exc:
                if not path:
                    raise
                bad[j] = f"image {path}: the image processor refused it: {exc}"
            if bad and self.policy == "error":
                raise BadImage(f"bad eval image (run with --bad-images skip to leave it out): {bad[j]}")
        return {"prepared": self.collator.prepare(good) if good else None, "bad": bad}


def mode_groups(config) -> list[tuple[list[int] | None, list[str]]]:
    """(paths of one forward, the modes read from it)."""
    if config.prefix_len == 0:
        return [(None, ["none"])]
    paths = list(range(config.num_paths))
    return [(paths, ["single", "aggregate"] if config.num_paths > 1 else ["single"]), (None, ["none"])]


def modes(config) -> list[str]:
    return [m for _, group in mode_groups(config) for m in group]


def _gather_rows(x: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's contiguous share of ``total`` rows, concatenated in rank order."""
    _, size = world()
    if size == 1:
        return x
    share = -(-total // size)
    padded = x.new_zeros(share, x.shape[1])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:total]


@torch.no_grad()
def encode_items(model, collator: Collator, items: list[Item], loader: ImageLoader, config, aggregator, device,
                 desc: str = "eval", should_stop: Callable[[], bool] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """(unit-norm embeddings ``[len(items), d]`` per mode, the items whose image failed: index -> why; their
    rows are zeros); this rank encodes its share, all ranks get all."""
    rank, size = world()
    share = -(-len(items) // size)
    mine = items[rank * share:(rank + 1) * share]
    batches = ItemBatches(mine, loader, collator, config.eval_batch_size, config.bad_images)
    workers = default_workers() if config.num_workers is None else config.num_workers
    data = DataLoader(batches, batch_size=None, num_workers=workers if len(batches) > 1 else 0,
                      pin_memory=torch.device(device).type == "cuda", worker_init_fn=ignore_signals)
    out: dict[str, list] = {m: [] for m in modes(config)}
    bad: dict[int, str] = {}  # index into mine
    for i, batch in enumerate(tqdm(interruptible(iterate(data), should_stop), total=len(batches), desc=desc,
                                   disable=rank != 0, leave=False)):
        bad.update({i * config.eval_batch_size + j: why for j, why in batch["bad"].items()})
        if batch["prepared"] is None:
            continue
        inputs = {k: v.to(device, non_blocking=True) for k, v in collator.assemble(batch["prepared"]).items()}
        for paths, group in mode_groups(config):
            with autocast(config.dtype, device):
                reps = models.encode(model, inputs, paths).float()
            for mode in group:
                out[mode].append(aggregator(reps) if mode == "aggregate" else reps[0])
    hidden = models.patch.hf_model(model).config.text_config.hidden_size
    flags = torch.tensor([float(j in bad) for j in range(len(mine))], device=device)[:, None]
    failed = _gather_rows(flags, len(items))[:, 0] > 0  # every rank learns every rank's failed items
    good = [j for j in range(len(mine)) if j not in bad]
    result = {}
    for mode, parts in out.items():
        local = torch.zeros(len(mine), hidden, device=device)
        if parts:
            local[good] = torch.cat(parts)
        emb = _gather_rows(local, len(items))
        if not torch.isfinite(emb).all():
            raise FloatingPointError(f"{desc} ({mode}): {int((~torch.isfinite(emb)).any(-1).sum())} of {len(items)} "
                                     f"embeddings are not finite (NaN/inf weights or inputs); refusing to score them")
        result[mode] = F.normalize(emb, dim=-1)
    reasons = {rank * share + j: why for j, why in bad.items()}  # only this rank knows why; all know which
    return result, {int(k): reasons.get(int(k), "the image failed on another rank") for k in failed.nonzero()[:, 0]}


def hits(queries: torch.Tensor, candidates: torch.Tensor, cands_of: list[list[int]]) -> torch.Tensor:
    """Per row (``queries[row]`` against ``candidates[cands_of[row]]``), whether candidate 0 scores strictly
    above every other candidate; a candidate identical to the positive (same text and image) is no rival."""
    width = max(len(c) for c in cands_of)
    index = torch.tensor([c + [c[0]] * (width - len(c)) for c in cands_of], device=candidates.device)
    scores = (queries @ candidates.T).gather(1, index)  # one matrix product, then each row's candidates
    rivals = scores[:, 1:].masked_fill(index[:, 1:] == index[:, :1], float("-inf"))
    if width == 1:
        return torch.ones(len(cands_of), dtype=torch.bool)
    return scores[:, 0] > rivals.max(dim=1).values


def _relevance(rows: list[dict], cands_of: list[list[int]], candidates: list[Item], failed: dict, num_queries: int):
    """(global?, gains ``[R, W]``, valid ``[R, W]``): MMEB rows score their own candidates (the positive's gain
    1, a copy of it invalid); visdoc rows (``rel_scores``) every distinct candidate of the subset."""
    if all("rel_scores" in r for r in rows):
        index = {item: i for i, item in enumerate(candidates)}
        gains = torch.zeros(len(rows), len(candidates), dtype=torch.float64)
        for i, row in enumerate(rows):
            keys = zip(row["tgt_text"], row["tgt_img_path"], row.get("tgt_video_path") or [""] * len(row["tgt_text"]))
            for key, value in zip(keys, row["rel_scores"]):
                gains[i, index[key]] = max(float(gains[i, index[key]]), value)  # a page listed twice: its best
        valid = torch.ones_like(gains, dtype=torch.bool)
        valid[:, [c - num_queries for c in failed if c >= num_queries]] = False
        return True, gains, valid
    width = max(len(c) for c in cands_of)
    index = torch.tensor([c + [c[0]] * (width - len(c)) for c in cands_of])
    gains = torch.zeros(len(cands_of), width, dtype=torch.float64)
    gains[:, 0] = 1.0
    valid = torch.ones_like(gains, dtype=torch.bool)
    valid[:, 1:] = index[:, 1:] != index[:, :1]  # padding and copies of the positive are no rivals
    return False, gains, valid


def _scores(queries: torch.Tensor, candidates: torch.Tensor, cands_of: list[list[int]], relevance):
    """(scores, gains, valid) of each row from one matrix product."""
    every, gains, valid = relevance
    scores = queries @ candidates.T
    if not every:
        width = gains.shape[1]
        index = torch.tensor([c + [c[0]] * (width - len(c)) for c in cands_of], device=scores.device)
        scores = scores.gather(1, index)
    return scores.cpu(), gains, valid


def evaluate_subset(model, collator: Collator, rows: list[dict], loader: ImageLoader, config, aggregator, device,
                    name: str = "eval", should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Precision@1 per mode and chance for one subset's rows."""
    return score_subset(model, collator, rows, loader, config, aggregator, device, name, should_stop)[0]


def score_subset(model, collator: Collator, rows: list[dict], loader: ImageLoader, config, aggregator, device,
                 name: str = "eval", should_stop: Callable[[], bool] | None = None
                 ) -> tuple[dict[str, float], int, int]:
    """(Precision@1 per mode and chance, rows dropped, candidates dropped for images that failed to decode)."""
    queries, candidates, query_of, cands_of = unique_items(rows)
    emb, failed = encode_items(model, collator, queries + candidates, loader, config, aggregator, device, name,
                               should_stop)
    dropped_rows = dropped_candidates = 0
    if failed:
        q = len(queries)
        # the start check's rule (eval_data.candidates_to_drop), on the items that failed only when decoded
        bad = [{i for i, item in enumerate([query_of[r], *(c + q for c in cands_of[r])]) if item in failed}
               for r in range(len(rows))]
        verdicts = [candidates_to_drop(bad[r], gains_of(rows[r], len(cands_of[r]))) for r in range(len(rows))]
        kept = [r for r, verdict in enumerate(verdicts) if verdict is not None]
        dropped_rows = len(rows) - len(kept)
        trimmed = [[c for i, c in enumerate(cands_of[r]) if i not in verdicts[r]] for r in kept]
        dropped_candidates = sum(len(cands_of[r]) for r in kept) - sum(len(c) for c in trimmed)
        log.warning("%s: %d images failed when decoded (--bad-images skip): dropped %d of %d rows and %d negative "
                    "candidates (first: %s)", name, len(failed), dropped_rows, len(rows), dropped_candidates,
                    next(iter(failed.values())))
        if not kept:
            raise BadImage(f"{name}: no row left to score (first bad image: {next(iter(failed.values()))})")
        query_of, cands_of, rows = [query_of[r] for r in kept], trimmed, [rows[r] for r in kept]
    relevance = _relevance(rows, cands_of, candidates, failed, len(queries))
    rows_q = torch.tensor(query_of)
    result: dict[str, float] = {}
    for mode, e in emb.items():
        scores, gains, valid = _scores(e[rows_q.to(e.device)], e[len(queries):], cands_of, relevance)
        metrics = ranking_metrics(scores, gains, valid)
        result[mode] = metrics.pop("hit@1")  # Precision@1 of MMEB's rows
        result.update({f"{mode} {metric}": value for metric, value in metrics.items()})
    _, gains, valid = relevance  # a random ranking's Hit@1: the relevant share of each row's candidates
    result["chance"] = float(((gains > 0) & valid).sum(1).double().div(valid.sum(1)).mean())
    return result, dropped_rows, dropped_candidates


def evaluate(model, collator: Collator, config, aggregator, device, out_dir: str | Path,
             should_stop: Callable[[], bool] | None = None) -> dict:
    """Every ``config.eval_data`` subset on all ranks; rank 0 writes ``eval.json`` and ``eval.md``."""
    was_training = model.training
    model.eval()
    loader = ImageLoader(config.image_dir, config.allow_outside_images, config.num_frames, config.video_fps)
    results: dict = {}
    for path in config.eval_data:  # the rows and candidates the start check kept (train/eval_data.py)
        data = load_eval_subset(path, config.image_dir, config.allow_outside_images, config.bad_images)
        refuse_unread_videos(collator, data.rows, path)
        subset = Path(path).stem
        results[subset], rows, candidates = score_subset(model, collator, data.rows, loader, config, aggregator,
                                                         device, subset, should_stop)
        results[subset].update(dropped_rows=data.dropped_rows + rows,
                               dropped_candidates=data.dropped_candidates + candidates)
    names = list(results)
    if names:
        results["average"] = {m: sum(results[n][m] for n in names) / len(names) for m in results[names[0]]
                              if m not in COUNTS}
    if world()[0] == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "eval.json").write_text(json.dumps(results, indent=1))
        (Path(out_dir) / "eval.md").write_text(markdown(results))
    model.train(was_training)
    return results


def markdown(results: dict) -> str:
    """Hit@1 (Precision@1 for MMEB's rows) and NDCG@5 per mode, and chance; Recall@k is in eval.json."""
    if not results:
        return ""
    first = next(iter(results.values()))
    modes = [c for c in first if c not in COUNTS and c != "chance" and " " not in c]
    cols = [(f"Hit@1 {m}", m) for m in modes] + [(f"NDCG@5 {m}", f"{m} ndcg@5") for m in modes
                                                 if f"{m} ndcg@5" in first] + [("chance", "chance")]
    lines = ["| subset | " + " | ".join(title for title, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[key]:.1f}" for _, key in cols) + " |")
    dropped = [f"{name} {row['dropped_rows']} rows, {row['dropped_candidates']} candidates"
               for name, row in results.items() if row.get("dropped_rows") or row.get("dropped_candidates")]
    if dropped:
        lines.append("\nLeft out for bad images (--bad-images skip): " + "; ".join(dropped) + ".")
    return "\n".join(lines) + "\n"
