"""Evaluation subsets checked before the first step, so that nothing in them stops the evaluation hours later:
every row (train/rows.py) and every image a row references, from its header (train/images.py ``check``:
outside ``--image-dir``, missing, not an image, decompression bomb, aspect ratio, float pixels; each distinct
path opened once). ``--bad-images error`` stops naming the file, the row and the field; ``skip`` drops a row
that has nothing left to score and any other bad candidate from its row's candidates (``candidates_to_drop``,
also the rule for items that fail only when decoded, and ``embed``'s), counting both. Evaluation reads its
subsets through the same function, so it scores exactly what the check kept."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import images, video
from .images import BadImage
from .rows import _where, load_eval_rows

log = logging.getLogger("pdf.data")


@dataclass
class EvalSubset:
    rows: list[dict]
    dropped_rows: int = 0
    dropped_candidates: int = 0


def candidates_to_drop(bad: set[int], gains: list[float]) -> set[int] | None:
    """Of one row whose items at ``bad`` (0: the query, i: candidate i - 1) have bad images: the candidates to
    drop, or None when nothing is left to score (a bad query, or no candidate with a gain > 0 left: the positive,
    candidate 0, of an MMEB or training row; every page with a gain > 0 of a visual-document row)."""
    negatives = {i - 1 for i in bad if i > 0}
    if 0 in bad or not any(g > 0 for i, g in enumerate(gains) if i not in negatives):
        return None
    return negatives


def gains_of(row: dict, candidates: int) -> list[float]:
    """A row's graded relevance per candidate: its ``rel_scores``, else 1 for the positive and 0 for the rest."""
    return row.get("rel_scores", [1.0] + [0.0] * (candidates - 1))


def load_eval_subset(path: str, image_dir: str, allow_outside: bool = False, policy: str = "skip") -> EvalSubset:
    """The subset's checked rows, with the rows and candidates dropped for bad images (``policy`` skip)."""
    verdicts: dict[str, str | None] = {}  # image path -> why it is bad, or None

    def bad(image: str, is_video: bool = False) -> str | None:
        if image and image not in verdicts:
            try:
                (video.check if is_video else images.check)(image_dir, image, allow_outside)
                verdicts[image] = None
            except BadImage as exc:
                verdicts[image] = str(exc)
        return verdicts.get(image)

    rows = load_eval_rows(path)
    ranked = sum("rel_scores" in row for row in rows)
    if 0 < ranked < len(rows):  # a visual-document subset ranks every row against the whole pool, MMEB rows do not
        raise ValueError(f"eval file {path}: {ranked} of {len(rows)} rows have 'rel_scores'; a file is either "
                         f"visual documents (every row with rel_scores) or MMEB rows (none)")
    kept, dropped_rows, dropped_candidates, first = [], 0, 0, None
    for index, row in enumerate(rows):
        videos = row.get("tgt_video_path") or [""] * len(row["tgt_img_path"])
        fields = [("qry_video_path", row["qry_video_path"], True) if row.get("qry_video_path") else
                  ("qry_img_path", row["qry_img_path"], False)]
        fields += [(f"tgt_video_path[{i}]", v, True) if v else (f"tgt_img_path[{i}]", p, False)
                   for i, (p, v) in enumerate(zip(row["tgt_img_path"], videos))]
        problems = [(i, f"{_where(path, index)}: '{key}': {why}") for i, (key, image, is_video) in enumerate(fields)
                    if (why := bad(image, is_video))]
        if not problems:
            kept.append(row)
            continue
        if policy == "error":
            raise BadImage(f"bad eval image (run with --bad-images skip to drop such rows and candidates): "
                           f"{problems[0][1]}")
        first = first or problems[0][1]
        negatives = candidates_to_drop({i for i, _ in problems}, gains_of(row, len(row["tgt_text"])))
        if negatives is None:
            dropped_rows += 1
            continue
        dropped_candidates += len(negatives)
        kept.append({**row, **{key: [t for i, t in enumerate(row[key]) if i not in negatives]
                               for key in ("tgt_text", "tgt_img_path", "tgt_video_path", "rel_scores") if key in row}})
    if first:
        log.warning("%s: bad images (--bad-images skip): dropped %d of %d rows and %d negative candidates "
                    "(first: %s)", path, dropped_rows, dropped_rows + len(kept), dropped_candidates, first)
    if not kept:
        raise ValueError(f"eval file {path}: no row left to score ({dropped_rows} dropped for bad images; "
                         f"first: {first})")
    return EvalSubset(kept, dropped_rows, dropped_candidates)


def check_eval_data(config) -> list[EvalSubset]:
    """Every ``config.eval_data`` subset checked (rows and images), before any training."""
    return [load_eval_subset(path, config.image_dir, config.allow_outside_images, config.bad_images)
            for path in config.eval_data]
