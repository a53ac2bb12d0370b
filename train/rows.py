"""MMEB rows from jsonl or parquet files, checked once at start: every problem names the file and the row
(1-based: the line of a jsonl file, the row of a parquet file) and what was expected.

Train rows: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` (the image paths may be empty or
absent for text-only sides), optionally hard negatives: ``neg_text`` a string (one negative, as MMEB and
VLM2Vec write it) or a list of strings, ``neg_image_path`` the same shape (or absent for text-only negatives).
Video sides (MMEB-V2): ``qry_video_path`` / ``pos_video_path`` (train), ``qry_video_path`` /
``tgt_video_path`` list (eval), with ``<|video_1|>`` in the side's text; a side has one image or one video.
Eval rows as MMEB-eval publishes them: ``qry_text``, ``qry_img_path``,
``tgt_text`` (list), ``tgt_img_path`` (list of the same length; the positive is candidate 0)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("pdf.data")
IMAGE_PLACEHOLDER = "<|image_1|>"
VIDEO_PLACEHOLDER = "<|video_1|>"  # a video side: ``qry_video_path``/``pos_video_path`` (a file or a frame folder)
BAD_ROW_POLICIES = ("skip", "error")


class BadRow(ValueError):
    pass


def read_rows(path: str) -> list[dict]:
    """All rows of one jsonl or parquet file; an unreadable line (not UTF-8, not a JSON object) is kept as
    ``BadRow`` in its place so that the caller's policy decides."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows: list = pq.read_table(file).to_pylist()
    else:
        rows = []
        with open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
                except (UnicodeDecodeError, ValueError) as exc:
                    rows.append(BadRow(f"{path} line {number}: {type(exc).__name__}: {exc}"))
    if not rows:
        raise ValueError(f"data file {path} holds no rows")
    return rows


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise BadRow(f"{where}: '{key}' expected a string, got {type(value).__name__}")
    return value


def _image(row: dict, key: str, where: str) -> str:
    value = row.get(key) or ""
    if not isinstance(value, str):
        raise BadRow(f"{where}: '{key}' expected an image path (string) or empty, got {type(value).__name__}")
    return value


def _one_placeholder(text: str, placeholder: str, path: str, text_key: str, path_key: str, what: str,
                     where: str) -> None:
    """At most one ``placeholder`` in ``text``, present exactly when the side has a ``path`` (image or video)."""
    if text.count(placeholder) > 1:
        raise BadRow(f"{where}: '{text_key}' has {text.count(placeholder)} {placeholder}; one {what} "
                     f"per side is supported")
    if (placeholder in text) != bool(path):
        raise BadRow(f"{where}: '{text_key}' {'has' if placeholder in text else 'has no'} "
                     f"{placeholder} but '{path_key}' is {repr(path) if path else 'empty'}")


def _agree_video(text: str, video: str, image: str, text_key: str, video_key: str, where: str) -> None:
    if video and image:
        raise BadRow(f"{where}: '{text_key}' side has both an image and '{video_key}'; one visual per side")
    _one_placeholder(text, VIDEO_PLACEHOLDER, video, text_key, video_key, "video", where)


def _agree(text: str, image: str, text_key: str, image_key: str, where: str, video: str = "") -> None:
    if not image and not video and not text.strip():  # no token at all: the row's embedding would have no input
        raise BadRow(f"{where}: '{text_key}' is {'empty' if not text else 'whitespace only'} and '{image_key}' "
                     f"is empty: nothing to embed")
    _one_placeholder(text, IMAGE_PLACEHOLDER, image, text_key, image_key, "image", where)


def _check_side(text: str, image: str, video: str, text_key: str, image_key: str, video_key: str,
                where: str) -> None:
    _agree(text, image, text_key, image_key, where, video)
    _agree_video(text, video, image, text_key, video_key, where)


def _negatives(row: dict, where: str) -> tuple[list[str], list[str]]:
    """The row's hard negatives as (texts, image paths) lists of one length; empty when it has none."""
    texts, images = row.get("neg_text"), row.get("neg_image_path")
    if texts is None or texts == "":
        if images:
            raise BadRow(f"{where}: 'neg_image_path' is {images!r:.80} but 'neg_text' is empty")
        return [], []
    single = isinstance(texts, str)
    texts = [texts] if single else texts
    if not isinstance(texts, list) or not all(isinstance(t, str) and t for t in texts):
        raise BadRow(f"{where}: 'neg_text' expected a string or a list of non-empty strings, got {texts!r:.80}")
    if not images:
        images = [""] * len(texts)
    elif single and isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) or p is None for p in images):
        raise BadRow(f"{where}: 'neg_image_path' expected {'an image path' if single else 'a list of image paths'}"
                     f" like 'neg_text', got {images!r:.80}")
    if len(images) != len(texts):
        raise BadRow(f"{where}: 'neg_text' has {len(texts)} negatives but 'neg_image_path' has {len(images)}")
    images = [p or "" for p in images]
    for i, (text, image) in enumerate(zip(texts, images)):
        _agree(text, image, f"neg_text[{i}]", f"neg_image_path[{i}]", where)
        # hard negatives carry images only: a video placeholder would fail mid-step, in the collator
        _one_placeholder(text, VIDEO_PLACEHOLDER, "", f"neg_text[{i}]", "neg_video_path (not read)", "video", where)
    return texts, images


def check_train_row(row: dict, where: str, hard_negatives: int = 0) -> dict:
    """The row reduced to its four fields and the two video paths (paths as strings, '' for none), plus ``neg_text`` and
    ``neg_image_path`` lists when it has hard negatives, or ``BadRow``; with ``hard_negatives`` > 0 a row
    with fewer negatives is a bad row."""
    out = {"qry": _text(row, "qry", where), "qry_image_path": _image(row, "qry_image_path", where),
           "pos_text": _text(row, "pos_text", where), "pos_image_path": _image(row, "pos_image_path", where)}
    videos = {key: _image(row, key, where) for key in ("qry_video_path", "pos_video_path")}
    _check_side(out["qry"], out["qry_image_path"], videos["qry_video_path"], "qry", "qry_image_path",
                "qry_video_path", where)
    _check_side(out["pos_text"], out["pos_image_path"], videos["pos_video_path"], "pos_text", "pos_image_path",
                "pos_video_path", where)
    out.update({key: path for key, path in videos.items() if path})  # only rows with videos carry the keys
    texts, images = _negatives(row, where)
    if len(texts) < hard_negatives:
        raise BadRow(f"{where}: --hard-negatives {hard_negatives} expected at least {hard_negatives} negatives in "
                     f"'neg_text', got {len(texts)}")
    if texts:
        out["neg_text"], out["neg_image_path"] = texts, images
    return out


def check_eval_row(row: dict, where: str) -> dict:
    out = {"qry_text": _text(row, "qry_text", where), "qry_img_path": _image(row, "qry_img_path", where)}
    texts, images = row.get("tgt_text"), row.get("tgt_img_path")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRow(f"{where}: 'tgt_text' expected a non-empty list of strings, got {texts!r:.80}")
    if images is None:
        images = [""] * len(texts)
    if not isinstance(images, list) or not all(isinstance(p, str) or p is None for p in images):
        raise BadRow(f"{where}: 'tgt_img_path' expected a list of image paths, got {images!r:.80}")
    if len(images) != len(texts):
        raise BadRow(f"{where}: 'tgt_text' has {len(texts)} candidates but 'tgt_img_path' has {len(images)}")
    out["tgt_text"], out["tgt_img_path"] = texts, [p or "" for p in images]
    out["qry_video_path"] = _image(row, "qry_video_path", where)
    videos = row.get("tgt_video_path") or [""] * len(texts)
    if not isinstance(videos, list) or not all(isinstance(p, str) or p is None for p in videos):
        raise BadRow(f"{where}: 'tgt_video_path' expected a list of video paths, got {videos!r:.80}")
    if len(videos) != len(texts):
        raise BadRow(f"{where}: 'tgt_text' has {len(texts)} candidates but 'tgt_video_path' has {len(videos)}")
    out["tgt_video_path"] = [p or "" for p in videos]
    _check_side(out["qry_text"], out["qry_img_path"], out["qry_video_path"], "qry_text", "qry_img_path",
                "qry_video_path", where)
    for i, (text, image, video) in enumerate(zip(out["tgt_text"], out["tgt_img_path"], out["tgt_video_path"])):
        _check_side(text, image, video, f"tgt_text[{i}]", f"tgt_img_path[{i}]", f"tgt_video_path[{i}]", where)
    if "rel_scores" in row:  # a visdoc row (MMEB-V2's qrels): ranked against every candidate of its subset
        scores = row["rel_scores"]
        if (not isinstance(scores, list) or len(scores) != len(texts) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < math.inf for x in scores)
                or not any(x > 0 for x in scores)):
            raise BadRow(f"{where}: 'rel_scores' expected a list of {len(texts)} finite numbers >= 0 (one per "
                         f"candidate, at least one > 0), got {scores!r:.80}")
        out["rel_scores"] = [float(x) for x in scores]
    if not out["qry_video_path"] and not any(out["tgt_video_path"]):  # rows without videos stay as they were
        del out["qry_video_path"], out["tgt_video_path"]
    return out


def _where(path: str, index: int) -> str:
    return f"{path} {'row' if path.endswith('.parquet') else 'line'} {index + 1}"


def load_train_rows(path: str, policy: str = "error", hard_negatives: int = 0) -> list[dict]:
    """A training subset, every row checked: a bad row stops the run (``error``) or is dropped with one
    warning that counts them and names the first (``skip``); a subset left empty stops the run. With
    ``hard_negatives`` > 0 a row with fewer hard negatives is a bad row."""
    if policy not in BAD_ROW_POLICIES:
        raise ValueError(f"config: 'bad_rows' expected one of {BAD_ROW_POLICIES}, got {policy!r}")
    good, bad = [], []
    for index, row in enumerate(read_rows(path)):
        try:
            if isinstance(row, BadRow):
                raise row
            good.append(check_train_row(row, _where(path, index), hard_negatives))
        except BadRow as exc:
            if policy == "error":
                raise BadRow(f"bad training row (run with --bad-rows skip to drop such rows): {exc}") from None
            bad.append(str(exc))
    if bad:
        log.warning("%s: dropped %d bad rows of %d (first: %s)", path, len(bad), len(bad) + len(good), bad[0])
    if not good:
        raise ValueError(f"data file {path}: no usable row ({len(bad)} bad; first: {bad[0]})")
    return good


def load_eval_rows(path: str) -> list[dict]:
    """An evaluation subset, every row checked; any bad row stops (a skipped row would change the metric)."""
    rows = []
    for index, row in enumerate(read_rows(path)):
        if isinstance(row, BadRow):
            raise row
        rows.append(check_eval_row(row, _where(path, index)))
    return rows
