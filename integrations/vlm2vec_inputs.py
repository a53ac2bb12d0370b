"""What VLM2Vec's collators hand the trainer, as the PDF step takes it: batches split in GradCache chunks, moved
to the device, and the hard negatives found in either layout:

- ``(qry, tgt, neg)``: a third batch of the B·H negatives, query-major (rows ``k·H … k·H + H − 1`` are query
  k's); what a collator of our ``neg_text``/``neg_image_path`` rows builds;
- ``(qry, tgt)`` with B·(1 + M) target rows: VLM2Vec's ``b3``/``v2.2`` collators put each query's positive
  and its M negatives in one row group (positive first), padding rows with fewer negatives with empty texts
  (``text`` ``''``) up to the batch's M. The first H of each group are used (H <= M).

A padding row (``text`` ``''``) is no candidate: it is counted (``negatives_skipped``), never trained on."""

from __future__ import annotations

import torch


class NegativesError(ValueError):
    """The batch does not hold the hard negatives the trainer was asked for; the message says what it holds."""


def rows(batch: dict) -> int:
    return len(batch["input_ids"])


def split_rows(batch: dict, size: int | None) -> list[dict]:
    """A collated batch in chunks of ``size`` rows: every tensor and list split along its first dimension, as
    VLM2Vec's GradCache splits its inputs; other values are shared."""
    count = rows(batch)
    if not size or size >= count:
        return [batch]
    return [select_rows(batch, range(start, min(start + size, count))) for start in range(0, count, size)]


def select_rows(batch: dict, index) -> dict:
    """The rows ``index`` (a range or a list) of a collated batch: tensors and lists with one entry per row."""
    count, index = rows(batch), list(index)
    positions = torch.tensor(index, dtype=torch.long)
    picked = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count:
            picked[key] = value[positions.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == count:
            picked[key] = type(value)(value[i] for i in index)
        else:
            picked[key] = value
    return picked


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in value):
        return type(value)(to_device(v, device) for v in value)
    return value


def _real(batch: dict) -> torch.Tensor:
    """Rows that are real inputs: a padding row of VLM2Vec's collators has the text ``''``."""
    texts = batch.get("text")
    if isinstance(texts, (list, tuple)) and len(texts) == rows(batch):
        return torch.tensor([bool(isinstance(t, str) and t.strip()) for t in texts], dtype=torch.bool)
    return torch.ones(rows(batch), dtype=torch.bool)


def split_inputs(inputs, hard_negatives: int) -> tuple[dict, dict, dict | None, torch.Tensor | None]:
    """``(queries, targets, negatives, valid)`` from what the collator gave (see the module's docstring);
    ``negatives`` has B·H rows, query-major, ``valid [B·H]`` marks the real ones; both None when H is 0."""
    if not isinstance(inputs, (list, tuple)) or len(inputs) not in (2, 3):
        raise NegativesError(f"pdf_trainer: the collator's batch expected (qry, tgt) or (qry, tgt, neg), got "
                             f"{type(inputs).__name__} of {len(inputs) if isinstance(inputs, (list, tuple)) else '?'}")
    queries, targets = inputs[0], inputs[1]
    b, h = rows(queries), hard_negatives
    if len(inputs) == 3:
        negatives = inputs[2]
        if h == 0:
            raise NegativesError("pdf_trainer: the collator gives a negatives batch but hard_negatives is 0: pass "
                                 "pdf_trainer(..., hard_negatives=H) to train on them")
        if rows(negatives) != b * h:
            raise NegativesError(f"pdf_trainer: hard_negatives={h} expected {b}·{h} = {b * h} negative rows for "
                                 f"{b} queries, got {rows(negatives)}")
        return queries, targets, negatives, _real(negatives)
    t = rows(targets)
    if t == b:
        if h:
            raise NegativesError(f"pdf_trainer: hard_negatives={h} but the batch holds no negatives ({b} queries, "
                                 f"{t} targets): use a collator that gives them (VLM2Vec's b3/v2.2 layout or a "
                                 f"third batch), or hard_negatives=0")
        return queries, targets, None, None
    if t % b or t // b < 2:
        raise NegativesError(f"pdf_trainer: {t} target rows for {b} queries: expected {b} or {b}·(1 + M)")
    group = t // b
    if h == 0:
        raise NegativesError(f"pdf_trainer: the targets hold {group - 1} negatives per query (VLM2Vec's b3 layout) "
                             f"but hard_negatives is 0: pass pdf_trainer(..., hard_negatives=H) to train on them")
    if group - 1 < h:
        raise NegativesError(f"pdf_trainer: hard_negatives={h} expected at least {h} negatives per query, the "
                             f"batch holds {group - 1} (its rows with the most)")
    positives = select_rows(targets, [k * group for k in range(b)])
    picked = [k * group + 1 + j for k in range(b) for j in range(h)]
    negatives = select_rows(targets, picked)
    return queries, positives, negatives, _real(negatives)
