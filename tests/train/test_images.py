"""Image files as the processors expect them, or ``BadImage`` naming the file (issue 21, items 3 and 5)."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pdfkernels.train.data import BadImage, ImageLoader

QWEN_MAX_ASPECT = 200  # Qwen2-VL's smart_resize raises above it (transformers' image_processing_qwen2_vl)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (the file stays tiny: no pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk +
                     struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND" +
                     struct.pack(">I", zlib.crc32(b"IEND")))


def test_a_decompression_bomb_is_a_bad_image(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(BadImage, match=r"bomb.png.*(decompression|pixels)"):
        ImageLoader(str(tmp_path))("bomb.png")


def test_an_image_above_the_processors_aspect_ratio_is_a_bad_image(tmp_path):
    Image.new("RGB", (QWEN_MAX_ASPECT + 1, 1), "red").save(tmp_path / "strip.png")
    with pytest.raises(BadImage, match=r"strip.png: aspect ratio 201:1"):
        ImageLoader(str(tmp_path))("strip.png")
    Image.new("RGB", (QWEN_MAX_ASPECT, 1), "red").save(tmp_path / "ok.png")
    assert ImageLoader(str(tmp_path))("ok.png").size == (QWEN_MAX_ASPECT, 1)


def _outside_setup(tmp_path):
    root, other = tmp_path / "images", tmp_path / "private"
    root.mkdir()
    other.mkdir()
    Image.new("RGB", (4, 4), "blue").save(other / "secret.png")
    Image.new("RGB", (4, 4), "blue").save(root / "inside.png")
    (root / "link.png").symlink_to(other / "secret.png")
    (root / "inner_link.png").symlink_to(root / "inside.png")
    return root, other


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_image_paths_leading_out_of_image_dir_are_refused_unless_allowed(tmp_path, kind):
    root, other = _outside_setup(tmp_path)
    path = {"absolute": str(other / "secret.png"), "dotdot": "../private/secret.png", "symlink": "link.png"}[kind]
    with pytest.raises(BadImage, match="outside --image-dir") as found:
        ImageLoader(str(root))(path)
    if kind != "symlink":  # the refusal is worded the same whether the file exists or not
        missing = path.replace("secret", "missing")
        with pytest.raises(BadImage) as absent:
            ImageLoader(str(root))(missing)
        assert str(absent.value) == str(found.value).replace("secret", "missing")
    assert ImageLoader(str(root), allow_outside=True)(path).size == (4, 4)
    assert ImageLoader(str(root))("inner_link.png").size == (4, 4)  # a symlink staying inside is fine


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)  # 3 wide, 2 high; the top-left pixel red
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100, subsampling=0)
    img = ImageLoader(str(tmp_path))("turned.jpg")
    assert img.size == (2, 3)
    upright = np.asarray(img).astype(int)
    assert upright[0, 1, 0] > 200 and upright[0, 0, 0] < 60  # red now at the top right


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    img = np.asarray(ImageLoader(str(tmp_path))("grey16.png"))
    assert img.dtype == np.uint8 and img.shape == (1, 4, 3)
    np.testing.assert_array_equal(img[0, :, 0], [0, 64, 128, 255])
    assert (img == img[..., :1]).all()  # grey: equal channels


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black: white when shown
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[0, 2] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    img = np.asarray(ImageLoader(str(tmp_path))("alpha.png")).astype(int)
    np.testing.assert_array_equal(img[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(img[0, 1], [255, 0, 0])
    assert abs(img[0, 2, 0] - 127) <= 1 and img[0, 2, 2] == 255


def test_float_pixels_are_refused(tmp_path):
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadImage, match="float"):
        ImageLoader(str(tmp_path))("float.tif")
