"""One video as the frames a backbone sees, or ``BadImage`` naming it (then handled by ``--bad-images`` like a
bad image, never a crash inside a step).

A video is a folder of frame images (sorted by the numbers in their names, as VLM2Vec's ``load_frames``) or a
video file decoded with PyAV (``pip install av``: FFmpeg bundled in its wheels, nothing to install on the
machine). ``num_frames`` frames are sampled uniformly over the video, ``np.linspace(0, n - 1, num_frames)``
as VLM2Vec's ``sample_frames`` (a shorter video repeats frames); with ``fps`` > 0 a file's video gives at
most ``duration × fps`` of them, never more than ``num_frames`` and at least 2 (one temporal patch) unless
``num_frames`` is 1. Refused: a missing path, a file PyAV cannot decode, zero frames, more than ``MAX_FRAMES``
frames (hours of video: decoding it to sample 8 frames would stall the step), frames that ``train/images.py``
refuses (a file's frame size from its header, before decoding). Frames are resized to the first frame's size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from . import images
from .images import BadImage

MAX_FRAMES = 100_000  # about an hour at 30 fps
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")  # VLM2Vec's IMAGE_EXTENSIONS


@dataclass
class Video:
    """The sampled frames of one video (RGB, one size)."""

    frames: list[Image.Image]
    path: str = ""


def sample_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``total`` frames (VLM2Vec's ``sample_frames``)."""
    if total < 1:
        raise ValueError(f"sample_indices: argument 'total' expected >= 1, got {total}")
    if num_frames < 1:
        raise ValueError(f"sample_indices: argument 'num_frames' expected >= 1, got {num_frames}")
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=lambda p: _natural(p.name))


def _decoder():
    try:
        import av
    except ImportError as exc:  # a configuration problem, not a bad video: stop the run
        raise RuntimeError("video files need PyAV: pip install av (or pdfkernels[video]); a folder of frame "
                           "images needs nothing") from exc
    return av


def _file_frames(full: Path, num_frames: int, fps: float) -> list[Image.Image]:
    av = _decoder()
    try:
        with av.open(str(full)) as container:
            if not container.streams.video:
                raise BadImage(f"video {full}: no video stream")
            stream = container.streams.video[0]
            if stream.width and stream.height:  # before a frame of it is decoded (a header without them: below)
                images.check_size(full, stream.width, stream.height, "video")
            # the header's count, else the packets, counted no further than the limit (a long file must not stall)
            total = stream.frames or sum(1 for _ in islice((p for p in container.demux(stream) if p.size),
                                                           MAX_FRAMES + 1))
            if total > MAX_FRAMES:
                raise BadImage(f"video {full}: {total} frames, above the {MAX_FRAMES} this trainer decodes")
            if total == 0:
                raise BadImage(f"video {full}: zero frames")
            count = num_frames
            if fps > 0 and stream.average_rate:
                count = min(num_frames, max(2, int(total / float(stream.average_rate) * fps)))
            wanted = sample_indices(total, count)
            container.seek(0)
            decoded: dict[int, Image.Image] = {}
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    decoded[index] = frame.to_image()
                if index >= wanted[-1]:
                    break
    except BadImage:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise BadImage(f"video {full}: {type(exc).__name__}: {exc}") from exc
    if not decoded:
        raise BadImage(f"video {full}: zero decodable frames")
    last = decoded[max(decoded)]  # a header that over-counts: the last decoded frame stands in (VLM2Vec pads so)
    return [decoded.get(i, last) for i in wanted]


def load(image_dir: str, path: str, num_frames: int = 8, fps: float = 0.0, allow_outside: bool = False) -> Video:
    """The sampled frames of ``image_dir/path`` (a folder of frames or a video file); ``BadImage`` naming it."""
    full = images.confined(image_dir, path, allow_outside)
    if full.is_dir():
        files = frame_files(full)
        if not files:
            raise BadImage(f"video {full}: a folder without frame images ({', '.join(FRAME_SUFFIXES)})")
        if len(files) > MAX_FRAMES:
            raise BadImage(f"video {full}: {len(files)} frames, above the {MAX_FRAMES} this trainer decodes")
        # each frame confined too: a symlinked frame must not lead out of image_dir
        frames = [images.load(image_dir, str(Path(path) / files[i].name), allow_outside)
                  for i in sample_indices(len(files), num_frames)]
    elif full.is_file():
        frames = [images.to_rgb(f, full) for f in _file_frames(full, num_frames, fps)]
        images.check_size(full, *frames[0].size, "video")  # the size every frame is given
    else:
        raise BadImage(f"video {full}: no such file or folder")
    size = frames[0].size
    return Video([f if f.size == size else f.resize(size, Image.Resampling.BICUBIC) for f in frames], path)


def check(image_dir: str, path: str, allow_outside: bool = False) -> None:
    """``BadImage`` for what is visible without decoding frames: outside ``image_dir``, missing, a folder
    without frames or with too many, a file without a video stream, with too many frames in its header or a
    frame size the image rules refuse (pixels, aspect ratio)."""
    full = images.confined(image_dir, path, allow_outside)
    if full.is_dir():
        count = len(frame_files(full))
        if not 0 < count <= MAX_FRAMES:
            raise BadImage(f"video {full}: a folder with {count} frame images (expected 1 to {MAX_FRAMES})")
        return
    if not full.is_file():
        raise BadImage(f"video {full}: no such file or folder")
    av = _decoder()
    try:
        with av.open(str(full)) as container:
            if not container.streams.video:
                raise BadImage(f"video {full}: no video stream")
            stream = container.streams.video[0]
            if stream.width and stream.height:  # a header without them: checked once decoded (load)
                images.check_size(full, stream.width, stream.height, "video")
            if stream.frames > MAX_FRAMES:
                raise BadImage(f"video {full}: {stream.frames} frames, above the {MAX_FRAMES} this trainer decodes")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise BadImage(f"video {full}: {type(exc).__name__}: {exc}") from exc
