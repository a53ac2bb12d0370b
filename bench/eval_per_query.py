"""The evaluation loop before MMEB-scale evaluation, kept as the reference that the new one is compared with
(tests: same Precision@1; benchmark: forwards and wall time). Each query re-embeds its whole candidate list,
one mode per call; the positive is candidate 0 and argmax picks the first of tied scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdfkernels import models


def _embed(model, collator, examples, paths, aggregator, device, chunk: int) -> torch.Tensor:
    out = []
    for start in range(0, len(examples), chunk):
        inputs = {k: v.to(device) for k, v in collator(examples[start:start + chunk]).items()}
        reps = models.encode(model, inputs, paths).float()
        out.append(aggregator(reps) if reps.shape[0] > 1 else reps[0])
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def precision_at_1(model, collator, rows: list[dict], loader, paths, aggregator, device, chunk: int = 64) -> float:
    queries = [(r["qry_text"], loader(r.get("qry_img_path") or "")) for r in rows]
    q = _embed(model, collator, queries, paths, aggregator, device, chunk)
    hits = 0
    for i, r in enumerate(rows):
        cands = [(t, loader(p or "")) for t, p in zip(r["tgt_text"], r["tgt_img_path"])]
        c = _embed(model, collator, cands, paths, aggregator, device, chunk)
        hits += int((c @ q[i]).argmax().item() == 0)
    return hits / len(rows)
