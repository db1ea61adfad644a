import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dynrefer.imageio import ImageError, decode_image, encode_jpeg


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _noise(w: int = 64, h: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) \
        + _chunk(b"IEND", b"")


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, name="img.bin", **kwargs)
    assert str(info.value).startswith("img.bin: ")
    return info.value.reason


def test_error_is_a_value_error_with_reason():
    err = ImageError("corrupt", "x: broken")
    assert isinstance(err, ValueError) and err.reason == "corrupt" and str(err) == "x: broken"


def test_empty_bytes():
    assert _reason(b"") == "empty"


def test_not_an_image():
    assert _reason(b"this is plain text, not an image at all") == "not_image"
    assert _reason(b"%PDF-1.4\n" + b"\x00" * 100) == "not_image"


def test_formats_outside_the_allowlist_are_not_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert _reason(eps) == "not_image"
    assert _reason(_save(_noise(8, 8), "PPM")) == "not_image"


def test_damaged_header_is_corrupt():
    data = bytearray(_save(_noise(), "JPEG"))
    data[3:400] = b"\xff" * 397
    assert _reason(bytes(data)) == "corrupt"


def test_damaged_png_stream_is_corrupt():
    data = bytearray(_save(_noise(), "PNG"))
    data[100:110] = b"\x00" * 10
    assert _reason(bytes(data)) == "corrupt"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP"])
def test_truncated_raises_instead_of_gray_fill(fmt):
    data = _save(_noise(), fmt)
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_bomb_rejected_from_header_by_pillow_limit():
    data = _png_claiming(100_000, 100_000)
    assert len(data) < 100
    assert _reason(data) == "too_large"


def test_bomb_rejected_from_header_by_our_limit():
    # 9000 x 9000 = 81M pixels: under Pillow's default limit, over ours; the IDAT holds 16 bytes, so
    # reaching "too_large" rather than "truncated" shows the check ran before decoding.
    assert _reason(_png_claiming(9000, 9000)) == "too_large"
    assert _reason(_save(_noise(20, 20), "PNG"), max_pixels=399) == "too_large"
    assert decode_image(_save(_noise(20, 20), "PNG"), max_pixels=400).size == (20, 20)


def test_unsupported_mode():
    lab = Image.new("RGB", (4, 4), (200, 30, 60)).convert("LAB")
    assert _reason(_save(lab, "TIFF")) == "unsupported_mode"


def test_rgb_values_kept_and_image_loaded():
    src = _noise()
    img = decode_image(_save(src, "PNG"))
    assert img.mode == "RGB" and img.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(src))


def test_exif_orientation_applied():
    src = np.zeros((16, 32, 3), np.uint8)
    src[:, :16] = (255, 0, 0)
    src[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    img = decode_image(_save(Image.fromarray(src), "PNG", exif=exif.tobytes()))
    assert img.size == (16, 32)
    out = np.asarray(img)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[-1, -1]) == (0, 0, 255)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_is_ignored():
    data = _save(_noise(8, 8), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert decode_image(data).size == (8, 8)


def _pixels(data: bytes) -> np.ndarray:
    img = decode_image(data)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_gray_and_gray_alpha():
    gray = np.array([[0, 100, 255]], np.uint8)
    np.testing.assert_array_equal(_pixels(_save(Image.fromarray(gray), "PNG"))[..., 0], gray)
    la = Image.fromarray(np.stack([gray, np.array([[0, 0, 255]], np.uint8)], axis=-1), mode="LA")
    out = _pixels(_save(la, "PNG"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


def test_one_bit():
    img = Image.new("1", (3, 1))
    img.putpixel((1, 0), 1)
    np.testing.assert_array_equal(_pixels(_save(img, "PNG"))[0, :, 1], [0, 255, 0])


@pytest.mark.parametrize("transparency", [None, 1])
def test_palette_colours_preserved(transparency):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    for x in range(3):
        img.putpixel((x, 0), x)
    if transparency is not None:
        img.info["transparency"] = transparency
    out = _pixels(_save(img, "PNG"))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 255, 0], [10, 20, 30]])


def test_rgba_drops_alpha_without_compositing():
    img = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    img.putpixel((1, 0), (200, 100, 50, 255))
    np.testing.assert_array_equal(_pixels(_save(img, "PNG"))[0], [[10, 20, 30], [200, 100, 50]])


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
    white = _pixels(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), fmt))
    assert (white >= 254).all()
    cyan = _pixels(_save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), fmt))
    np.testing.assert_allclose(cyan[4, 4], [0, 255, 255], atol=2)


def test_ycbcr():
    src = Image.new("RGB", (4, 4), (200, 30, 60))
    np.testing.assert_allclose(_pixels(_save(src.convert("YCbCr"), "TIFF"))[0, 0], [200, 30, 60], atol=3)


def test_16_bit_png_scales_by_full_range():
    values = np.array([[0, 255, 256, 32768, 65535]], np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = _pixels(_save(img, "PNG"))
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 1, 128, 255]])
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("colour_type,channels", [(2, 3), (4, 2), (6, 4)])  # RGB, gray+alpha, RGBA
def test_16_bit_png_of_every_colour_type_keeps_the_high_byte(colour_type, channels):
    """16-bit PNGs that Pillow cannot write (written chunk by chunk here) decode by their high byte, alpha dropped."""
    samples = np.array([0, 255, 256, 32768, 40000, 65535], np.uint16)
    pixels = np.stack([np.roll(samples, c) for c in range(channels)], axis=-1)[None]  # (1, 6, channels)
    ihdr = struct.pack(">IIBBBBB", 6, 1, 16, colour_type, 0, 0, 0)
    raw = b"\x00" + pixels.astype(">u2").tobytes()
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    out = _pixels(data)
    colour = pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(out, (colour >> 8).astype(np.uint8))


def test_16_bit_big_endian_tiff():
    raw = np.array([0, 65535, 32768, 256], ">u2").tobytes()
    img = Image.frombytes("I;16B", (4, 1), raw)
    np.testing.assert_array_equal(_pixels(_save(img, "TIFF"))[..., 1], [[0, 255, 128, 1]])


def test_32_bit_int_treated_as_16_bit():
    img = Image.fromarray(np.array([[-5, 0, 32768, 65535, 70000]], np.int32))
    assert img.mode == "I"
    np.testing.assert_array_equal(_pixels(_save(img, "TIFF"))[..., 0], [[0, 0, 128, 255, 255]])


def test_float_taken_in_unit_range():
    img = Image.fromarray(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]], np.float32))
    assert img.mode == "F"
    np.testing.assert_array_equal(_pixels(_save(img, "TIFF"))[..., 0], [[0, 0, 128, 255, 255, 0]])


def test_multi_frame_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert tuple(_pixels(data)[0, 0]) == (255, 0, 0)
    tiff = _save(frames[1], "TIFF", save_all=True, append_images=frames[:1])
    assert tuple(_pixels(tiff)[0, 0]) == (0, 0, 255)
    mpo = _save(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    np.testing.assert_allclose(_pixels(mpo)[0, 0], (255, 0, 0), atol=2)


def test_encode_jpeg_round_trip():
    src = Image.new("RGB", (16, 8), (40, 120, 200))
    data = encode_jpeg(src, quality=90)
    assert data[:3] == b"\xff\xd8\xff"
    np.testing.assert_allclose(np.asarray(decode_image(data)), np.asarray(src), atol=3)
    assert decode_image(encode_jpeg(Image.new("L", (4, 4), 7))).getpixel((0, 0)) == (7, 7, 7)


# ---------------------------------------------------------------------------------------------- reduced decoding


def _scene(width: int, height: int) -> Image.Image:
    """Smooth colour fields with sharp-edged shapes: a photo's mix of flat areas and edges."""
    from PIL import ImageDraw

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x, y = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        draw.ellipse([x, y, x + int(rng.integers(40, 200)), y + int(rng.integers(40, 200))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


BIG_BOXES = [[100, 150, 700, 900], [1300, 200, 2350, 1500], [600, 500, 1200, 1150]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_reduced_decode_gives_the_views_of_the_full_decode_from_a_fraction_of_the_pixels(fmt):
    from dynrefer.imageio import decode_reduced, probe_size
    from dynrefer.views import crop_views, reduction_factor, view_boxes

    width, height, size = 2400, 1600, 64
    data = _save(_scene(width, height), fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    factor = reduction_factor(BIG_BOXES, size)
    assert factor == 4 and probe_size(data) == (width, height)
    full, reduced = decode_image(data), decode_reduced(data, factor)
    assert reduced.size == (width, height) and reduced.factor == factor
    assert reduced.image.size == (width // factor, height // factor) and reduced.image.mode == "RGB"
    boxes = np.concatenate([view_boxes(b, width, height, [0.0, 0.2, 0.5, 1.0]) for b in BIG_BOXES])
    diff = np.abs(crop_views(full, boxes, size).astype(int) - crop_views(reduced, boxes, size).astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))


def test_reduced_decode_keeps_exif_orientation_and_original_pixel_frame():
    from dynrefer.imageio import decode_reduced, probe_size
    from dynrefer.views import crop_views

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    data = _save(_scene(1600, 800), "JPEG", quality=92, exif=exif)
    assert probe_size(data) == (800, 1600)
    full, reduced = decode_image(data), decode_reduced(data, 4)
    assert full.size == reduced.size == (800, 1600) and reduced.image.size == (200, 400)
    boxes = np.array([[0, 0, 800, 1600], [100, 300, 700, 1100]])
    diff = np.abs(crop_views(full, boxes, 32).astype(int) - crop_views(reduced, boxes, 32).astype(int))
    assert diff.mean() < 1.0


def test_reduction_is_what_the_smallest_view_allows():
    from dynrefer.views import reduction_factor

    assert reduction_factor([[0, 0, 5000, 5000]], 224) == 11  # 5000 // (2 * 224)
    assert reduction_factor([[0, 0, 5000, 5000], [10, 10, 400, 3000]], 224) == 1  # 390 px: no room to reduce
    assert reduction_factor([], 224) == 1


def test_reduced_jpeg_decode_peaks_at_a_fraction_of_the_full_decode():
    """Peak RSS of a fresh process decoding one 6000x6000 JPEG: DCT scaling never makes the full-size pixels."""
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(_save(_scene(6000, 6000), "JPEG", quality=90))
        f.flush()
        # The peak is VmHWM, reset just before the decode (imports may have peaked higher than any decode).
        script = ("import sys; from dynrefer.imageio import decode_image, decode_reduced; "
                  "kb = lambda key: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key))); "
                  "data = open(sys.argv[1], 'rb').read(); open('/proc/self/clear_refs', 'w').write('5'); "
                  "before = kb('VmRSS:'); "
                  "img = decode_reduced(data, 8).image if sys.argv[2] == 'reduced' else decode_image(data); "
                  "print(kb('VmHWM:') - before, img.size[0])")
        peak = {}
        for how in ("full", "reduced"):
            out = subprocess.run([sys.executable, "-c", script, f.name, how], capture_output=True, text=True,
                                 check=True, timeout=120).stdout.split()
            peak[how] = int(out[0]) * 1024
            assert int(out[1]) == (6000 if how == "full" else 750)
    assert peak["full"] > 90e6 and peak["reduced"] < peak["full"] / 8, peak
