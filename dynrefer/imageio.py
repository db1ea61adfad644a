"""Decode image bytes once into a loaded RGB ``PIL.Image``, or fail with an :class:`ImageError` saying why.

Every stage that touches pixels (Ray Data preparation, batch captioning, the Serve app) goes through
:func:`decode_image`, so they agree on orientation, colour conversion and what counts as a bad file.

Choices worth knowing:

* Truncated files raise (``reason="truncated"``); ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set,
  because silently gray-filled pixels would poison training data.
* The pixel count is checked from the header before any pixel is decoded. The limit is the smaller of
  ``max_pixels`` and Pillow's global ``Image.MAX_IMAGE_PIXELS`` (whose DecompressionBombError, and the
  images its warning is about, become ``reason="too_large"``); raise that global to allow more.
* EXIF orientation is applied (a corrupt EXIF block is ignored: the pixels are still good).
* Alpha is dropped without compositing (``convert("RGB")``): colour under transparent pixels is kept.
* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) maps by the type's full range, ``v >> 8``,
  so 65535 -> 255 and 32768 -> 128 (Pillow's own conversion clips everything above 255 to white).
  ``I`` (32-bit int, in practice 16-bit samples, e.g. signed 16-bit TIFF) is treated as 16-bit: clipped
  to [0, 65535], then ``>> 8``. ``F`` (float) is taken to be in [0, 1]: clipped, times 255, rounded;
  NaN -> 0.
* Multi-frame files (GIF, APNG, multi-page TIFF, MPO) give their first frame.
* ICC profiles are not applied; CMYK uses Pillow's plain conversion.
* Only :data:`FORMATS` are tried: the formats image datasets use, and none whose plugin runs an external
  program (Pillow's EPS reader would start Ghostscript on untrusted bytes).
* :func:`decode_reduced` decodes at 1/``factor`` of the size when the caller needs no more (a server's views
  of a 40 Mpx photo need a fraction of its pixels): JPEGs by DCT scaling (``draft``), so the full-size pixels
  never exist; other formats are decoded, then box-averaged (``Image.reduce``) before any conversion copies them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Formats Pillow may open ("JPEG" also opens MPO, the multi-picture JPEG some cameras write).
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")

#: Modes Pillow converts to RGB correctly with ``convert("RGB")``.
_DIRECT_MODES = frozenset({"RGB", "RGBX", "RGBA", "L", "LA", "1", "CMYK", "YCbCr"})
#: Palette modes go through RGBA so transparency never triggers Pillow's palette warnings.
_PALETTE_MODES = frozenset({"P", "PA"})
_UINT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

#: Leading bytes of formats we know, to tell a damaged image from something that is no image at all.
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM",
)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short machine-readable code.

    Reasons: ``empty``, ``not_image``, ``corrupt``, ``truncated``, ``too_large``, ``unsupported_mode``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _load_error(name: str, err: Exception) -> ImageError:
    text = str(err) or type(err).__name__
    if isinstance(err, MemoryError):
        return ImageError("too_large", f"{name}: out of memory while decoding")
    if isinstance(err, EOFError) or "truncated" in text.lower():
        return ImageError("truncated", f"{name}: truncated image data ({text})")
    return ImageError("corrupt", f"{name}: corrupt image data ({text})")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any decoded image as RGB: 16-bit and float greys scaled to 8 bits, palettes and alpha dropped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    if mode in _PALETTE_MODES:
        return img.convert("RGBA").convert("RGB")
    if mode in _UINT16_MODES:
        gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "I":
        gray = (np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        gray = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ImageError("unsupported_mode", f"{name}: unsupported image mode {mode!r}")
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")


def _open(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """The image's header, opened and checked (format, size, pixel limit), before any pixel is decoded."""
    if not data:
        raise ImageError("empty", f"{name}: no image data (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"{name}: {e}") from None
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise ImageError("corrupt", f"{name}: image header is damaged, cannot identify the format") from None
        raise ImageError("not_image", f"{name}: not an image (unrecognised format, {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _load_error(name, e) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"{name}: image header gives size {width}x{height}")
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if width * height > limit:
        raise ImageError(
            "too_large", f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limit}"
        )
    return img


def _load(img: Image.Image, name: str) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise _load_error(name, e) from None


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return img


#: EXIF orientation -> the transposition that makes the image upright (as ``ImageOps.exif_transpose``).
_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
#: EXIF orientations that swap width and height.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return 1


def probe_size(data: bytes, max_pixels: int = 64_000_000, name: str = "image") -> tuple[int, int]:
    """(width, height) of the upright image from its header alone, checked as :func:`decode_image` checks it:
    boxes can be validated, and a reduction chosen, before any pixel is decoded."""
    img = _open(data, max_pixels, name)
    width, height = img.size
    return (height, width) if _orientation(img) in _SWAPPING_ORIENTATIONS else (width, height)


def decode_image(data: bytes, max_pixels: int = 64_000_000, name: str = "image") -> Image.Image:
    """Decode ``data`` into a loaded RGB image, upright per EXIF; raise :class:`ImageError` otherwise.

    ``name`` (a file name or URI) prefixes every error message.
    """
    img = _open(data, max_pixels, name)
    _load(img, name)
    return to_rgb(_upright(img), name)


@dataclass(frozen=True)
class ReducedImage:
    """An image decoded at 1/``factor`` of its size. ``size`` is the full upright size, the frame boxes are given
    in (so code that reads ``.size`` keeps working in original pixels); pixel ``(i, j)`` of ``image`` covers
    original pixels ``[i * factor, (i + 1) * factor)`` (the edge rows and columns may cover fewer)."""

    image: Image.Image
    size: tuple[int, int]
    factor: int

    def box(self, box: tuple[float, float, float, float] | list[float]) -> tuple[float, float, float, float]:
        """An original-pixel box in the decoded image's pixels."""
        x1, y1, x2, y2 = (float(v) / self.factor for v in box)
        return x1, y1, min(x2, self.image.width), min(y2, self.image.height)


#: Modes ``Image.reduce`` averages as they are; others are converted to RGB first.
_REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "CMYK", "I", "F"})


def decode_reduced(data: bytes, factor: int, max_pixels: int = 64_000_000, name: str = "image") -> ReducedImage:
    """:func:`decode_image` at 1/``factor`` of the size: the same checks, orientation and colour handling, a
    fraction of the memory.

    A JPEG is decoded at the largest DCT scale (1/2, 1/4, 1/8) that divides ``factor``, then box-averaged by what
    is left; other formats are decoded at full size and box-averaged at once, so one full-size copy exists only
    while it is averaged.
    """
    if factor < 1:
        raise ValueError(f"decode_reduced: factor must be at least 1, got {factor}")
    img = _open(data, max_pixels, name)
    full, orientation = img.size, _orientation(img)
    if factor > 1 and img.format == "JPEG":
        scale = next(s for s in (8, 4, 2, 1) if factor % s == 0)
        img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (-(-full[0] // scale), -(-full[1] // scale)))
    _load(img, name)
    scale = next((s for s in (1, 2, 4, 8) if img.size == (-(-full[0] // s), -(-full[1] // s))), 1)
    if factor // scale > 1:
        img = (img if img.mode in _REDUCIBLE_MODES else to_rgb(img, name)).reduce(factor // scale)
    if orientation in _TRANSPOSES:
        img = img.transpose(_TRANSPOSES[orientation])
    size = (full[1], full[0]) if orientation in _SWAPPING_ORIENTATIONS else full
    return ReducedImage(to_rgb(img, name), size, scale * (factor // scale))


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of an image (converted to RGB first when needed), for storing decoded crops or images."""
    rgb = img if img.mode == "RGB" else to_rgb(img, "image")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()
