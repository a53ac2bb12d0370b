"""Generated MMEB-V2-style video subsets beside the shapes set: a shape of one class (colour, shape, size) at a
new place in each of a few frames, stored as frame folders (``images/videos/<name>/frame_<i>.png``) and, with
PyAV installed, every fourth one as an MPEG-4 file (``images/videos/<name>.mp4``). The texts use the shapes
set's words only, so the tiny presets' tokenizer (and the shapes demo) stays as it is.

Writes ``train/t2v.jsonl`` (``qry`` a caption, ``pos_text`` ``<|video_1|> ...``, ``pos_video_path``) and
``eval/t2v.jsonl`` (``qry_text``, ``tgt_text``/``tgt_video_path`` lists, the positive first)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from .rows import VIDEO_PLACEHOLDER
from .synthetic import _classes, caption, draw

SIDE, FRAMES, EVAL_CANDIDATES = 32, 6, 4


def frames(cls: tuple[str, str, str], rng: random.Random) -> list[Image.Image]:
    return [draw(*cls, rng) for _ in range(FRAMES)]


def write_frames(folder: Path, clip: list[Image.Image]) -> Path:
    """``clip`` as a frame folder, ``frame_1.png`` .. ``frame_n.png`` (natural order: frame_10 after frame_9)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(clip):
        frame.save(folder / f"frame_{i + 1}.png")
    return folder


def write_video(path: Path, clip: list[Image.Image], fps: int = 4) -> Path:
    """``clip`` as an MPEG-4 file, written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = clip[0].size
        stream.pix_fmt = "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return path


def _write(folder: Path, name: str, clip: list[Image.Image], as_file: bool) -> str:
    if as_file:
        write_video(folder / f"{name}.mp4", clip)
        return f"videos/{name}.mp4"
    write_frames(folder / name, clip)
    return f"videos/{name}"


def generate(out_dir: str | Path, num_train: int = 40, num_eval: int = 8, seed: int = 0) -> Path:
    out = Path(out_dir)
    folder = out / "images" / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import av  # noqa: F401
        files = True
    except ImportError:
        files = False
    rng = random.Random(seed)
    classes = _classes()
    target = f"{VIDEO_PLACEHOLDER} what is shown in the image"
    counter = iter(range(10**9))

    def new_video(cls) -> str:
        i = next(counter)
        return _write(folder, f"v{i:06d}", frames(cls, rng), files and i % 4 == 3)

    for split, count in (("train", num_train), ("eval", num_eval)):
        (out / split).mkdir(parents=True, exist_ok=True)
        with open(out / split / "t2v.jsonl", "w") as f:
            for _ in range(count):
                cls = rng.choice(classes)
                query = f"find an image of {caption(*cls)}"
                if split == "train":
                    row = {"qry": query, "qry_image_path": "", "pos_text": target, "pos_image_path": "",
                           "pos_video_path": new_video(cls)}
                else:
                    others = rng.sample([c for c in classes if c != cls], EVAL_CANDIDATES - 1)
                    row = {"qry_text": query, "qry_img_path": "", "tgt_text": [target] * EVAL_CANDIDATES,
                           "tgt_img_path": [""] * EVAL_CANDIDATES,
                           "tgt_video_path": [new_video(c) for c in [cls, *others]]}
                f.write(json.dumps(row) + "\n")
    return out
