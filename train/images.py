"""One image file as the image processors expect it, or ``BadImage`` naming the file and why (then handled
by ``--bad-images``, never a crash inside a step).

- Paths stay inside ``--image-dir`` (an absolute path, ``..`` or a symlink leading out is refused with the
  same words whether or not the file exists) unless ``--allow-outside-images``; with no image dir the
  paths are used as given.
- Refused before decoding: more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb; the
  processors would shrink it anyway) and an aspect ratio above ``MAX_ASPECT`` (Qwen2-VL's processor raises
  on it, inside the batch).
- ``check`` applies every rule above, and refuses float pixels, from the file's header alone (no decoding):
  the cheap check of the evaluation images before the first step.
- Decoded as 8-bit RGB: the EXIF orientation applied (as Hugging Face's ``load_image``), 16-bit grey
  scaled to 8 bits (``convert`` would clip it to white), transparency composited on white (as the
  processors' ``convert_to_rgb``); 32-bit float images, whose range is undefined, are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_ASPECT = 200  # Qwen2-VL's smart_resize: "absolute aspect ratio must be smaller than 200"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(Exception):
    pass


def confined(image_dir: str, path: str, allow_outside: bool = False) -> Path:
    """``image_dir/path``, refused when it leads out of ``image_dir`` (symlinks followed)."""
    full = Path(image_dir) / path
    if allow_outside or not image_dir:
        return full
    root = Path(image_dir).resolve()
    real = full.resolve()
    if real != root and root not in real.parents:
        raise BadImage(f"image {path!r} is outside --image-dir {image_dir} (an absolute path, '..' or a symlink "
                       f"leading out); pass --allow-outside-images to read such paths")
    return full


def check_size(full: Path, width: int, height: int, what: str = "image") -> None:
    """The pixel-count and aspect-ratio rules of one image, or of each frame of a video (``what``)."""
    if width < 1 or height < 1:
        raise BadImage(f"{what} {full}: size {width}x{height} has no pixels")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise BadImage(f"{what} {full}: {width}x{height} = {width * height} pixels, above the "
                       f"{Image.MAX_IMAGE_PIXELS} that Pillow decodes without a decompression-bomb warning")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise BadImage(f"{what} {full}: aspect ratio {max(width, height) / min(width, height):.0f}:1 ({width}x"
                       f"{height}) is above {MAX_ASPECT}:1, which the image processors refuse")


def _check_mode(img: Image.Image, full: Path | str) -> None:
    if img.mode == "F":
        raise BadImage(f"image {full}: 32-bit float pixels have no defined range; convert it to 8 or 16 bits")


def to_rgb(img: Image.Image, full: Path | str = "image") -> Image.Image:
    """8-bit RGB without losing 16-bit grey to clipping or leaving transparent pixels undefined."""
    _check_mode(img, full)
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise BadImage(f"image {full}: {img.mode} pixels outside the 16-bit range")
        img = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


@contextmanager
def _opened(full: Path) -> Iterator[Image.Image]:
    """The file opened lazily (header read, size checked); Pillow's errors as ``BadImage`` naming it."""
    try:
        with Image.open(full) as img:
            check_size(full, *img.size)
            yield img
    except Image.DecompressionBombError as exc:  # not an OSError: raised by Image.open itself
        raise BadImage(f"image {full}: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"image {full}: {type(exc).__name__}: {exc}") from exc


def check(image_dir: str, path: str, allow_outside: bool = False) -> None:
    """``BadImage`` for what the header shows ``load`` would refuse (outside, missing, not an image, bomb,
    aspect, float pixels). Damaged pixel data past a valid header is found only by ``load``."""
    full = confined(image_dir, path, allow_outside)
    with _opened(full) as img:  # EXIF orientation only swaps width and height: no effect on these rules
        _check_mode(img, full)


def load(image_dir: str, path: str, allow_outside: bool = False) -> Image.Image:
    """The RGB image at ``image_dir/path``; ``BadImage`` naming it for anything that cannot be trained on."""
    full = confined(image_dir, path, allow_outside)
    with _opened(full) as img:  # reads the header only
        upright = ImageOps.exif_transpose(img)
        check_size(full, *upright.size)
        return to_rgb(upright, full)
