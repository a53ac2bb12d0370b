"""Generated inputs at MMEB's scale for the data-pipeline and evaluation benchmarks: 1344x1344 JPEG photos-like
images (smooth gradients, shapes and mild noise, so decoding costs what a photo costs) with image-to-image
training rows, and a retrieval eval set of queries against one shared candidate pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pdfkernels.train.data import IMAGE_PLACEHOLDER
from pdfkernels.train.synthetic import all_words

SIDE = 1344


def jpeg(path: Path, seed: int, side: int = SIDE) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([x * rng.uniform(80, 255), y * rng.uniform(80, 255), (1 - x) * rng.uniform(80, 255)], -1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, side - 200, 2)
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse((int(x0), int(y0), int(x0) + 200, int(y0) + 150), fill=colour)
    img.save(path, quality=90)


def image_pairs(folder: Path, images: int, rows: int) -> Path:
    """``folder/pairs.jsonl``: image-to-image rows (an image on both sides) over ``images`` distinct JPEGs."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        if not (folder / "images" / f"{i}.jpg").exists():
            jpeg(folder / "images" / f"{i}.jpg", i)
    text = f"{IMAGE_PLACEHOLDER} find a similar image"
    with open(folder / "pairs.jsonl", "w") as f:
        for r in range(rows):
            f.write(json.dumps({"qry": text, "qry_image_path": f"{r % images}.jpg", "pos_text": text,
                                "pos_image_path": f"{(r + 1) % images}.jpg"}) + "\n")
    return folder / "pairs.jsonl"


def _words(i: int, words: list[str], count: int) -> str:
    """A distinct word sequence per ``i`` (its base-len(words) digits), so no two texts tokenize alike."""
    return " ".join(words[(i // len(words) ** k) % len(words)] for k in range(count))


def retrieval_rows(queries: int, pool: int) -> list[dict]:
    """Text-to-text retrieval rows: query i's candidates are the whole shared pool, its positive first."""
    words = [w for w in all_words() if w.isalpha()]
    caption = ["a " + _words(i, words, 4) for i in range(pool)]
    rows = []
    for i in range(queries):
        order = [i % pool] + [j for j in range(pool) if j != i % pool]
        rows.append({"qry_text": "find " + _words(i, words, 4), "qry_img_path": "",
                     "tgt_text": [caption[j] for j in order], "tgt_img_path": [""] * pool})
    return rows
