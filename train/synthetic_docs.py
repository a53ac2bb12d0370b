"""A generated visual-document subset in MMEB-V2's visdoc form: page images (a shape among text-like grey
lines) retrieved by a long text query. Eval rows carry ``rel_scores`` (qrels: 1 for the page of the query's
shape, 0 for judged non-relevant pages), so each query ranks every page of the subset (NDCG@5, Hit@1).

Writes ``images/docs/*.png``, ``train/t2d.jsonl`` and ``eval/visdoc.jsonl``; the shapes set's words only."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .rows import IMAGE_PLACEHOLDER
from .synthetic import IMAGE_SIDE, _classes, caption, draw

PAGE = (48, 64)  # width, height: a portrait page
JUDGED = 3  # candidates listed per eval query: its page and two judged non-relevant ones


def page(cls, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", PAGE, (250, 250, 250))
    d = ImageDraw.Draw(img)
    for y in range(4, PAGE[1] - 4, 5):  # lines of "text"
        d.line((4, y, rng.randint(20, PAGE[0] - 4), y), fill=(120, 120, 120))
    img.paste(draw(*cls, rng), ((PAGE[0] - IMAGE_SIDE) // 2, rng.randint(0, PAGE[1] - IMAGE_SIDE)))
    return img


def query(cls) -> str:
    return f"find the image of the page in which is shown {caption(*cls)} what is shown in the image of {caption(*cls)}"


def generate(out_dir: str | Path, num_train: int = 40, num_eval: int = 8, seed: int = 0) -> Path:
    out = Path(out_dir)
    (out / "images" / "docs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classes = _classes()
    target = f"{IMAGE_PLACEHOLDER} what is shown in the image"
    counter = iter(range(10**9))

    def new_page(cls) -> str:
        name = f"docs/p{next(counter):06d}.png"
        page(cls, rng).save(out / "images" / name)
        return name

    for split, count in (("train", num_train), ("eval", num_eval)):
        (out / split).mkdir(parents=True, exist_ok=True)
        with open(out / split / ("t2d.jsonl" if split == "train" else "visdoc.jsonl"), "w") as f:
            for _ in range(count):
                cls = rng.choice(classes)
                if split == "train":
                    row = {"qry": query(cls), "qry_image_path": "", "pos_text": target,
                           "pos_image_path": new_page(cls)}
                else:
                    others = rng.sample([c for c in classes if c != cls], JUDGED - 1)
                    row = {"qry_text": query(cls), "qry_img_path": "", "tgt_text": [target] * JUDGED,
                           "tgt_img_path": [new_page(c) for c in [cls, *others]],
                           "rel_scores": [1] + [0] * (JUDGED - 1)}
                f.write(json.dumps(row) + "\n")
    return out
