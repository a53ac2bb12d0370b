"""Tiny generated videos for the video tests: a square moving across a few frames, as a frame folder or an
MPEG-4 file written with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def moving_square(frames: int, side: int = 32, color=(220, 30, 30), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(frames):
        pixels = np.full((side, side, 3), 230, dtype=np.uint8) + rng.integers(0, 20, (side, side, 3), dtype=np.uint8)
        x = (t * 2) % (side - 8)  # distinct places for up to 12 frames
        pixels[8:16, x:x + 8] = color
        out.append(Image.fromarray(pixels))
    return out


def write_frames(folder: Path, frames: list[Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame_{i + 1}.png")  # 1..n: natural order (frame_10 after frame_9)
    return folder


def write_video(path: Path, frames: list[Image.Image], fps: int = 4) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
