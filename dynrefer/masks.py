"""Binary region masks from what clients send: arrays, PIL images, PNG bytes or base64, COCO run-length encodings,
and an image's own alpha channel. Every mask becomes an (H, W) bool array; a region's box is its tight box
(:func:`dynrefer.predictor.mask_box`).

COCO RLE (``{"size": [h, w], "counts": ...}``) counts alternating runs of 0s and 1s, 0s first, over the pixels in
column-major order; ``counts`` is a list of ints (uncompressed) or the compressed string of pycocotools'
``rleToString``: each count, after the third, as the difference from the count two before it, in 5-bit groups
(least significant first) of the characters ``48 + group`` with bit 0x20 meaning "more groups follow" and bit 0x10
of the last group its sign. Written here from that description (pycocotools is only the tests' reference).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Mask values a region prompt may be, in words (for error messages).
MASK_FORMS = "a PNG (bytes or base64), a COCO RLE {'size': [h, w], 'counts': ...}, or an (H, W) array"


class MaskError(ValueError):
    """A mask that cannot be used; the message names the mask and says why."""


def rle_counts(counts: str, name: str = "mask", max_runs: int | None = None) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``); at most ``max_runs`` of them
    and 13 groups (65 bits) per count, so that a hostile string costs no more than a real one."""
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        if max_runs is not None and len(out) >= max_runs:
            raise MaskError(f"{name}: RLE string holds more runs than the mask has pixels")
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise MaskError(f"{name}: RLE string ends inside a count")
            if k >= 13:
                raise MaskError(f"{name}: RLE string has a count beyond 65 bits")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise MaskError(f"{name}: RLE string has a character outside '0'..'o' at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_string(counts: list[int]) -> str:
    """The compressed string of run lengths (pycocotools' ``rleToString``), the inverse of :func:`rle_counts`."""
    chars = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            group = x & 0x1F
            x >>= 5
            more = (x != -1) if group & 0x10 else (x != 0)
            if more:
                group |= 0x20
            chars.append(chr(group + 48))
    return "".join(chars)


def rle_decode(rle: Mapping[str, Any], name: str = "mask", max_pixels: int = 64_000_000) -> np.ndarray:
    """The (H, W) bool mask of a COCO RLE with uncompressed (list) or compressed (string) counts."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise MaskError(f"{name}: RLE 'size' must be [height, width], two positive integers")
    h, w = size
    if h * w > max_pixels:
        raise MaskError(f"{name}: RLE size {h}x{w} exceeds the limit of {max_pixels} pixels")
    if isinstance(counts, (bytes, bytearray)):
        counts = bytes(counts).decode("ascii", errors="replace")
    if isinstance(counts, str):
        runs = rle_counts(counts, name, max_runs=h * w + 1)
    elif isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        runs = counts
    else:
        raise MaskError(f"{name}: RLE 'counts' must be a list of integers or a compressed RLE string")
    if any(c < 0 for c in runs):
        raise MaskError(f"{name}: RLE counts must not be negative")
    if sum(runs) != h * w:
        raise MaskError(f"{name}: RLE counts add up to {sum(runs)} pixels; size {h}x{w} has {h * w}")
    values = np.arange(len(runs)) % 2 == 1  # 0s first
    return np.repeat(values, runs).reshape(w, h).T


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """The uncompressed COCO RLE of a binary mask (for clients and tests; :func:`rle_decode` reads it back)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def array_mask(mask: np.ndarray | Image.Image, name: str = "mask") -> np.ndarray:
    """An (H, W) bool mask of an array or image: its non-zero pixels (the alpha channel of a 2- or 4-channel one)."""
    if isinstance(mask, Image.Image):
        return image_mask(mask, name)
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., -1] if m.shape[2] in (2, 4) else m.max(axis=2)
    if m.ndim != 2:
        raise MaskError(f"{name}: expected an (H, W) binary mask, got shape {m.shape}")
    return m != 0


def image_mask(img: Image.Image, name: str = "mask") -> np.ndarray:
    """A decoded mask image as bool: its alpha channel where it has one (transparent = outside), else its
    non-zero pixels."""
    if alpha_channel(img) is not None:
        return np.asarray(img.convert("RGBA").getchannel("A")) != 0
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img) != 0
    return np.asarray(img.convert("L")) != 0


def alpha_channel(img: Image.Image) -> np.ndarray | None:
    """The image's alpha channel as uint8 (H, W), or None when it has none."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        return np.asarray(img.convert("RGBA").getchannel("A"))
    return None


def open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An encoded image, loaded and upright per EXIF (as :func:`dynrefer.imageio.decode_image` turns the pixels
    it masks), checked against ``max_pixels`` before its pixels are decoded."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise MaskError(f"{name}: {img.width}x{img.height} exceeds the limit of {max_pixels} pixels")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        if isinstance(e, MaskError):
            raise
        raise MaskError(f"{name}: not a readable image ({type(e).__name__})") from None
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return img


def decode_mask(value: Any, name: str = "mask", max_pixels: int = 64_000_000) -> np.ndarray:
    """An (H, W) bool mask from any of :data:`MASK_FORMS` (a base64 string may carry a ``data:`` prefix)."""
    if isinstance(value, Mapping):
        return rle_decode(value, name, max_pixels)
    if isinstance(value, str):
        text = value.partition(",")[2] if value.startswith("data:") else value
        try:
            value = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MaskError(f"{name}: a string mask must be a base64 PNG") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return image_mask(open_image(bytes(value), name, max_pixels), name)
    if isinstance(value, (np.ndarray, Image.Image)):
        return array_mask(value, name)
    raise MaskError(f"{name}: expected {MASK_FORMS}, got {type(value).__name__}")


def alpha_mask(data: bytes, name: str = "image", max_pixels: int = 64_000_000) -> np.ndarray | None:
    """The region an image marks with its alpha channel (alpha >= 128: at least half opaque), or None when the
    image has no alpha channel or is opaque everywhere (it marks no region)."""
    alpha = alpha_channel(open_image(data, name, max_pixels))
    if alpha is None or alpha.min() >= 128:
        return None
    return alpha >= 128
