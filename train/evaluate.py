"""MMEB-eval Precision@1: each query ranks its candidates (the positive is candidate 0) by cosine similarity.

At MMEB scale (1000 queries, 1000 candidates each from a shared pool) each distinct query and each distinct
candidate (by text and image path) is encoded once, in batches, the image decoding and processing in
data-loader workers; when distributed, every rank encodes a contiguous share and the embeddings are
gathered. Scores are one matrix product per subset. A query counts as a hit only when its positive scores
strictly above every other candidate (ties go against it, so degenerate all-equal embeddings score 0), and
non-finite embeddings stop the evaluation.

Modes (the paper's Table 3 rows R5-R7): ``single`` (path 0, the deployed embedding), ``aggregate`` (all
paths and the aggregator), ``none`` (no prefix: the plain backbone). ``single`` and ``aggregate`` come from
the same N-path forward (path 0 of it is the single-path embedding)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pdfkernels import models

from .data import Collator, ImageLoader
from .eval_data import load_eval_subset
from .loader import default_workers, ignore_signals, interruptible, iterate
from .losses import world
from .precision import autocast

Item = tuple[str, str]  # (text, image path or "")
COUNTS = ("dropped_rows", "dropped_candidates")  # per subset in eval.json: what --bad-images skip left out


def unique_items(rows: list[dict]) -> tuple[list[Item], list[Item], list[int], list[list[int]]]:
    """(distinct queries, distinct candidates, each row's query index, each row's candidate indices)."""
    queries: dict[Item, int] = {}
    candidates: dict[Item, int] = {}
    query_of = [queries.setdefault((r["qry_text"], r["qry_img_path"]), len(queries)) for r in rows]
    cands_of = [[candidates.setdefault(c, len(candidates)) for c in zip(r["tgt_text"], r["tgt_img_path"])]
                for r in rows]
    return list(queries), list(candidates), query_of, cands_of


class ItemBatches(Dataset):
    """Batch i of ``items``: images decoded and the collator's ``prepare`` run (in a worker)."""

    def __init__(self, items: list[Item], loader: ImageLoader, collator: Collator, batch_size: int):
        self.items, self.loader, self.collator, self.batch_size = items, loader, collator, batch_size

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        chunk = self.items[i * self.batch_size:(i + 1) * self.batch_size]
        return self.collator.prepare([(text, self.loader(path)) for text, path in chunk])


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
                 desc: str = "eval", should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Unit-norm embeddings ``[len(items), d]`` per mode; this rank encodes its share, all ranks get all."""
    rank, size = world()
    share = -(-len(items) // size)
    mine = items[rank * share:(rank + 1) * share]
    batches = ItemBatches(mine, loader, collator, config.eval_batch_size)
    workers = default_workers() if config.num_workers is None else config.num_workers
    data = DataLoader(batches, batch_size=None, num_workers=workers if len(batches) > 1 else 0,
                      pin_memory=torch.device(device).type == "cuda", worker_init_fn=ignore_signals)
    out: dict[str, list] = {m: [] for m in modes(config)}
    for prepared in tqdm(interruptible(iterate(data), should_stop), total=len(batches), desc=desc, disable=rank != 0,
                         leave=False):
        inputs = {k: v.to(device, non_blocking=True) for k, v in collator.assemble(prepared).items()}
        for paths, group in mode_groups(config):
            with autocast(config.dtype, device):
                reps = models.encode(model, inputs, paths).float()
            for mode in group:
                out[mode].append(aggregator(reps) if mode == "aggregate" else reps[0])
    hidden = models.patch._hf_model(model).config.text_config.hidden_size
    result = {}
    for mode, parts in out.items():
        local = torch.cat(parts) if parts else torch.empty(0, hidden, device=device)
        emb = _gather_rows(local, len(items))
        if not torch.isfinite(emb).all():
            raise FloatingPointError(f"{desc} ({mode}): {int((~torch.isfinite(emb)).any(-1).sum())} of {len(items)} "
                                     f"embeddings are not finite (NaN/inf weights or inputs); refusing to score them")
        result[mode] = F.normalize(emb, dim=-1)
    return result


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


def evaluate_subset(model, collator: Collator, rows: list[dict], loader: ImageLoader, config, aggregator, device,
                    name: str = "eval", should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Precision@1 per mode and chance for one subset's rows."""
    queries, candidates, query_of, cands_of = unique_items(rows)
    emb = encode_items(model, collator, queries + candidates, loader, config, aggregator, device, name, should_stop)
    rows_q = torch.tensor(query_of)
    result = {mode: float(hits(e[rows_q.to(e.device)], e[len(queries):], cands_of).float().mean())
              for mode, e in emb.items()}
    result["chance"] = sum(1 / len(c) for c in cands_of) / len(rows)
    return result


def evaluate(model, collator: Collator, config, aggregator, device, out_dir: str | Path,
             should_stop: Callable[[], bool] | None = None) -> dict:
    """Every ``config.eval_data`` subset on all ranks; rank 0 writes ``eval.json`` and ``eval.md``."""
    was_training = model.training
    model.eval()
    loader = ImageLoader(config.image_dir, config.allow_outside_images)
    results: dict = {}
    for path in config.eval_data:  # the rows and candidates the start check kept (train/eval_data.py)
        data = load_eval_subset(path, config.image_dir, config.allow_outside_images, config.bad_images)
        subset = Path(path).stem
        results[subset] = evaluate_subset(model, collator, data.rows, loader, config, aggregator, device, subset,
                                          should_stop)
        results[subset].update(dropped_rows=data.dropped_rows, dropped_candidates=data.dropped_candidates)
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
    if not results:
        return ""
    cols = [c for c in next(iter(results.values())) if c not in COUNTS]
    lines = ["| subset | " + " | ".join(f"P@1 {c}" if c != "chance" else "chance" for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
    dropped = [f"{name} {row['dropped_rows']} rows, {row['dropped_candidates']} candidates"
               for name, row in results.items() if row.get("dropped_rows") or row.get("dropped_candidates")]
    if dropped:
        lines.append("\nLeft out for bad images (--bad-images skip): " + "; ".join(dropped) + ".")
    return "\n".join(lines) + "\n"
