"""Tiny generated videos for the video tests: a square moving across a few frames, written as a frame folder or
an MPEG-4 file by the synthetic video set's writers."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pdfkernels.train.synthetic_video import write_frames, write_video  # noqa: F401  (the tests' writers)


def moving_square(frames: int, side: int = 32, color=(220, 30, 30), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(frames):
        pixels = np.full((side, side, 3), 230, dtype=np.uint8) + rng.integers(0, 20, (side, side, 3), dtype=np.uint8)
        x = (t * 2) % (side - 8)  # distinct places for up to 12 frames
        pixels[8:16, x:x + 8] = color
        out.append(Image.fromarray(pixels))
    return out


