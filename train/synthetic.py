"""A small, real MMEB-format data set for demos and tests: coloured shapes with captions.

    python -m pdfkernels.train.synthetic OUT_DIR [--train 2000 --eval 200 --seed 0]

Writes ``OUT_DIR/images/*.png``, ``OUT_DIR/train/{t2i,i2t}.jsonl`` (MMEB train rows: ``qry``,
``qry_image_path``, ``pos_text``, ``pos_image_path``) and ``OUT_DIR/eval/{t2i,i2t}.jsonl`` (MMEB eval rows:
``qry_text``, ``qry_img_path``, ``tgt_text`` list, ``tgt_img_path`` list, the positive first). Text-to-image
rows retrieve the image of a caption, image-to-text rows the caption of an image. With ``--hard-negatives H``
every training row also carries H hard negatives (``neg_text``, ``neg_image_path`` lists): shapes of other
classes that share the positive's colour or shape where one exists.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20),
          "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
IMAGE_TOKEN = "<|image_1|>"
IMAGE_SIDE = 32
EVAL_CANDIDATES = 10  # chance level 10%


def caption(color: str, shape: str, size: str) -> str:
    return f"a {size} {color} {shape}"


def draw(color: str, shape: str, size: str, rng: random.Random) -> Image.Image:
    """A shape of the colour on a light background, at a random place; noise in the background."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(4, 6) if size == "small" else rng.randint(10, 13)
    cx, cy = rng.randint(r, IMAGE_SIDE - r), rng.randint(r, IMAGE_SIDE - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = max(1, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return img


def _classes() -> list[tuple[str, str, str]]:
    return [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]


def all_words() -> list[str]:
    """Every word the generated texts use (for a tokenizer built locally)."""
    words = {"find", "an", "image", "of", "what", "is", "shown", "in", "the", "a"}
    words.update(COLORS, SHAPES, SIZES)
    return sorted(words)


def _hard_classes(cls, classes, count: int, rng: random.Random) -> list:
    """``count`` other classes, those sharing the colour or the shape first (the harder negatives)."""
    near = [c for c in classes if c != cls and (c[0] == cls[0] or c[1] == cls[1])]
    far = [c for c in classes if c != cls and c not in near]
    return (rng.sample(near, min(count, len(near))) + rng.sample(far, max(0, count - len(near))))[:count]


def generate(out_dir: str | Path, num_train: int = 2000, num_eval: int = 200, seed: int = 0,
             hard_negatives: int = 0) -> Path:
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classes = _classes()

    def new_image(split: str, index: int, cls) -> str:
        name = f"{split}_{index:06d}.png"
        draw(*cls, rng).save(out / "images" / name)
        return name

    for split, count in (("train", num_train), ("eval", num_eval)):
        (out / split).mkdir(exist_ok=True)
        rows = {"t2i": [], "i2t": []}
        for i in range(count):
            cls = rng.choice(classes)
            task = "t2i" if i % 2 == 0 else "i2t"
            image = new_image(split, i, cls)
            if split == "train":
                if task == "t2i":
                    rows[task].append({"qry": f"find an image of {caption(*cls)}", "qry_image_path": "",
                                       "pos_text": f"{IMAGE_TOKEN} what is shown in the image",
                                       "pos_image_path": image})
                else:
                    rows[task].append({"qry": f"{IMAGE_TOKEN} what is shown in the image", "qry_image_path": image,
                                       "pos_text": caption(*cls), "pos_image_path": ""})
                if hard_negatives:
                    hard = _hard_classes(cls, classes, hard_negatives, rng)
                    if task == "t2i":
                        rows[task][-1].update(
                            neg_text=[f"{IMAGE_TOKEN} what is shown in the image"] * len(hard),
                            neg_image_path=[new_image("neg", i * 100 + j, c) for j, c in enumerate(hard)])
                    else:
                        rows[task][-1].update(neg_text=[caption(*c) for c in hard], neg_image_path=[""] * len(hard))
                continue
            negatives = rng.sample([c for c in classes if c != cls], EVAL_CANDIDATES - 1)
            if task == "t2i":
                images = [image] + [new_image(split, i * 100 + j + 10**5, c) for j, c in enumerate(negatives)]
                rows[task].append({"qry_text": f"find an image of {caption(*cls)}", "qry_img_path": "",
                                   "tgt_text": [f"{IMAGE_TOKEN} what is shown in the image"] * EVAL_CANDIDATES,
                                   "tgt_img_path": images})
            else:
                rows[task].append({"qry_text": f"{IMAGE_TOKEN} what is shown in the image", "qry_img_path": image,
                                   "tgt_text": [caption(*c) for c in [cls, *negatives]],
                                   "tgt_img_path": [""] * EVAL_CANDIDATES})
        for task, task_rows in rows.items():
            with open(out / split / f"{task}.jsonl", "w") as f:
                for row in task_rows:
                    f.write(json.dumps(row) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard-negatives", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate(args.out_dir, args.train, args.eval, args.seed, args.hard_negatives))


if __name__ == "__main__":
    main()
