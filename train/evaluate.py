"""MMEB-eval Precision@1: each query ranks its candidates (the positive is candidate 0) by cosine similarity.

Modes (the paper's Table 3 rows R5-R7): ``single`` (path 0, the deployed embedding), ``aggregate`` (all
paths and the aggregator), ``none`` (no prefix: the plain backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pdfkernels import models

from .data import ImageLoader, load_rows


def _embed(model, collator, examples, paths, aggregator, device, chunk: int) -> torch.Tensor:
    out = []
    for start in range(0, len(examples), chunk):
        inputs = {k: v.to(device) for k, v in collator(examples[start:start + chunk]).items()}
        reps = models.encode(model, inputs, paths).float()
        out.append(aggregator(reps) if reps.shape[0] > 1 else reps[0])
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def precision_at_1(model, collator, rows: list[dict], loader: ImageLoader, paths, aggregator, device,
                   chunk: int = 64) -> float:
    queries = [(r["qry_text"], loader(r.get("qry_img_path") or "")) for r in rows]
    q = _embed(model, collator, queries, paths, aggregator, device, chunk)
    hits = 0
    for i, r in enumerate(rows):
        cands = [(t, loader(p or "")) for t, p in zip(r["tgt_text"], r["tgt_img_path"])]
        c = _embed(model, collator, cands, paths, aggregator, device, chunk)
        hits += int((c @ q[i]).argmax().item() == 0)
    return hits / len(rows)


def modes(config) -> dict[str, list[int] | None]:
    if config.prefix_len == 0:
        return {"none": None}
    found = {"single": [0]}
    if config.num_paths > 1:
        found["aggregate"] = list(range(config.num_paths))
    found["none"] = None
    return found


def evaluate(model, collator, config, aggregator, device, out_dir: str | Path) -> dict:
    was_training = model.training
    model.eval()
    loader = ImageLoader(config.image_dir)
    results: dict = {}
    for path in config.eval_data:
        rows = load_rows(path)
        subset = Path(path).stem
        results[subset] = {mode: precision_at_1(model, collator, rows, loader, p, aggregator, device)
                           for mode, p in modes(config).items()}
        results[subset]["chance"] = sum(1 / len(r["tgt_text"]) for r in rows) / len(rows)
    names = list(results)
    if names:
        results["average"] = {m: sum(results[n][m] for n in names) / len(names) for m in results[names[0]]}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "eval.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (Path(out_dir) / "eval.md").write_text(table)
    model.train(was_training)
    return results


def markdown(results: dict) -> str:
    if not results:
        return ""
    cols = list(next(iter(results.values())))
    lines = ["| subset | " + " | ".join(f"P@1 {c}" if c != "chance" else "chance" for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"
