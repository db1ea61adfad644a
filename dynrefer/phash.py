"""Perceptual hashes of many views at once, bit-identical to ``imagehash.phash``, and DynRefer's view selection.

DynRefer keeps, besides the region view (t=0), the candidate views whose perceptual hash differs most from
the region's per unit of t. Hashing each candidate with ``imagehash.phash`` is a PIL round trip per view;
here a whole batch goes through the same arithmetic at once, so the codes are the same bits:

1. grayscale as Pillow's ``convert('L')``: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``;
2. the LANCZOS resize to 32x32 as Pillow's ``libImaging/Resample.c``: per axis, fixed-point weights with
   22 fractional bits, a horizontal then a vertical pass (vertical first for tall inputs), each pass
   rounded and clipped to 0..255;
3. ``scipy.fftpack.dct`` along rows then columns, the 8x8 low-frequency block, bits where it exceeds its
   median, first bit most significant (the integer of imagehash's hex string).

Step 1 is exact in float32 (every sum is an integer below 2**24). The resize sums of step 2 are float32
BLAS products over band blocks of the weight matrix; a rigorous bound on their rounding error decides
almost every output byte, and the few sums too close to a rounding boundary are redone exactly in float64.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy.fftpack
from PIL import Image

HASH_SIZE = 8
#: imagehash's ``hash_size * highfreq_factor``: the side of the thumbnail that gets the DCT.
IMG_SIZE = 32
#: The side the official DynRefer code resizes a view to before its DCT.
OFFICIAL_SIZE = 224

_PRECISION_BITS = 22  # Resample.c: 32 - 8 (result) - 2 (overflow)
_LANCZOS_SUPPORT = 3.0
# Pillow's L24 weights over 2**16: products with a byte and their sums stay below 2**24, exact in float32.
_GRAY_WEIGHTS = np.array([19595, 38470, 7471], dtype=np.float32) / 65536
# OpenCV's fixed-point RGB2GRAY weights (BT.601 over 2**15, as cv2 4.x computes it), the official code's grayscale.
_OFFICIAL_GRAY_WEIGHTS = np.array([9798, 19235, 3735], dtype=np.float32) / 32768
_F32_ROUNDOFF = 2.0**-24
_GUARD_SLACK = 2.0**-20  # covers the float32 rounding of the guard's own subtraction and limit
_BAND = 8  # output pixels per band block of a resize matrix: a block only touches the inputs it needs
_CHUNK_PIXELS = 1 << 18  # pixels per chunk (about 5 views of 224x224): float copies stay in cache
_GROUP_VIEWS = 64  # views per group of chunks for the second pass and the DCT


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    """Pillow's lanczos_filter, in Python floats so the weights round exactly as the C doubles do."""
    if -_LANCZOS_SUPPORT <= x < _LANCZOS_SUPPORT:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


@functools.lru_cache(maxsize=256)
def _lanczos_weights(in_size: int) -> np.ndarray:
    """Pillow's fixed-point LANCZOS weights for resizing ``in_size`` pixels to 32 along one axis.  # (32, in_size)

    Follows ``precompute_coeffs`` and ``normalize_coeffs_8bpc``: each output's taps around its centre,
    normalised to sum 1, then rounded half away from zero to multiples of 2**-22 (kept as int64).
    """
    if in_size < 1:
        raise ValueError(f"cannot resize an axis of {in_size} pixels")
    scale = in_size / IMG_SIZE
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    inv_filterscale = 1.0 / filterscale
    weights = np.zeros((IMG_SIZE, in_size), dtype=np.int64)
    for out in range(IMG_SIZE):
        center = (out + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = [_lanczos((x - center + 0.5) * inv_filterscale) for x in range(xmin, xmax)]
        total = 0.0
        for w in taps:
            total += w
        if total != 0.0:
            taps = [w / total for w in taps]
        for x, w in zip(range(xmin, xmax), taps):
            weights[out, x] = int((-0.5 if w < 0 else 0.5) + w * (1 << _PRECISION_BITS))
    weights.flags.writeable = False
    return weights


class _Axis(NamedTuple):
    """One resize pass over an axis of ``in_size`` pixels, prepared once per size."""

    blocks: tuple[tuple[int, int, int, np.ndarray, np.ndarray], ...]  # (first, lo, hi, (g, span), (span, g))
    dense: np.ndarray  # (32, in_size) float64: the weights, for exact recomputation
    limit: np.float32  # a float32 sum closer than this to an integer rounds as the exact sum does


@functools.lru_cache(maxsize=256)
def _axis(in_size: int) -> _Axis:
    """The resize matrix cut into band blocks of ``_BAND`` outputs, in float32, with its rounding guard.

    A block reads only the inputs ``lo:hi`` its outputs use, which skips most of the zeros. Weights are
    multiples of 2**-22 below 2 in magnitude, exact in float32, so a block product is the fixed-point sum
    over 2**-22 up to the float32 dot-product error gamma_m * sum|x * w| (m nonzero terms, bytes x <= 255;
    Higham, Accuracy and Stability of Numerical Algorithms, 3.1; a zero weight adds an exact zero).
    ``limit`` is 0.5 minus the largest such bound: a float32 sum nearer than that to an integer is farther
    than the bound from every half-integer, so it rounds half up as the exact sum does. The rest are
    redone exactly in float64 from ``dense``.
    """
    weights = _lanczos_weights(in_size)
    dense = np.ldexp(weights.astype(np.float64), -_PRECISION_BITS)  # (32, in_size)
    dense.flags.writeable = False
    blocks = []
    for first in range(0, IMG_SIZE, _BAND):
        used = np.flatnonzero(weights[first:first + _BAND].any(axis=0))
        lo, hi = int(used[0]), int(used[-1]) + 1
        block = dense[first:first + _BAND, lo:hi].astype(np.float32)  # (g, span)
        block_t = np.ascontiguousarray(block.T)  # (span, g): C order, so BLAS gets no strided operand
        block.flags.writeable = block_t.flags.writeable = False
        blocks.append((first, lo, hi, block, block_t))
    terms = np.count_nonzero(weights, axis=1)  # (32,)
    gamma = terms * _F32_ROUNDOFF / (1 - terms * _F32_ROUNDOFF)
    error = gamma * 255 * np.abs(dense).sum(axis=1) + _GUARD_SLACK
    return _Axis(tuple(blocks), dense, np.float32(0.5 - error.max()))


def _round_bytes(acc: np.ndarray, limit: float, exact: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``clip8`` of a pass: the sum rounded half up and clipped to a byte, as float32 (``acc`` is clobbered).

    Entries whose float32 sum lies within the error bound of a half-integer get ``exact(rows, cols)``.
    """
    rounded = np.rint(acc)  # equals floor(sum + 0.5) wherever the guard below passes
    np.subtract(acc, rounded, out=acc)
    np.abs(acc, out=acc)
    close = np.flatnonzero(acc >= limit)
    if len(close):
        rows, cols = np.divmod(close, acc.shape[1])
        rounded[rows, cols] = np.floor(exact(rows, cols) + 0.5)
    return np.clip(rounded, 0.0, 255.0, out=rounded)


def _horizontal_sums(x: np.ndarray, axis: _Axis) -> np.ndarray:
    """Float32 weighted sums of the rows of ``x`` (M, in_size), band block by band block.  # (M, 32)"""
    acc = np.empty((x.shape[0], IMG_SIZE), dtype=np.float32)
    for first, lo, hi, _, block_t in axis.blocks:
        np.matmul(x[:, lo:hi], block_t, out=acc[:, first:first + block_t.shape[1]])
    return acc


def _vertical_sums(x: np.ndarray, axis: _Axis) -> np.ndarray:
    """Float32 weighted sums of the columns of ``x`` (in_size, C), band block by band block.  # (32, C)"""
    acc = np.empty((IMG_SIZE, x.shape[1]), dtype=np.float32)
    for first, lo, hi, block, _ in axis.blocks:
        np.matmul(block, x[lo:hi], out=acc[first:first + len(block)])
    return acc


def _horizontal_pass(x: np.ndarray) -> np.ndarray:
    """Pillow's horizontal pass over the rows of ``x`` (M, in_size), float32 bytes.  # (M, 32) float32"""
    axis = _axis(x.shape[1])

    def exact(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", x[rows].astype(np.float64), axis.dense[cols])

    return _round_bytes(_horizontal_sums(x, axis), axis.limit, exact)


def _vertical_pass(x: np.ndarray) -> np.ndarray:
    """Pillow's vertical pass over the columns of ``x`` (in_size, C), float32 bytes.  # (32, C) float32"""
    axis = _axis(x.shape[0])

    def exact(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ji->i", axis.dense[rows], x[:, cols].astype(np.float64))

    return _round_bytes(_vertical_sums(x, axis), axis.limit, exact)


def _horizontal_first(height: int, width: int) -> bool:
    """Resample.c runs the vertical pass first when the height shrinks more than twice as much as the width."""
    shrink_h, shrink_w = height - IMG_SIZE, width - IMG_SIZE
    return not (shrink_h > 0 and shrink_h > 2 * shrink_w)


def _first_pass(gray: np.ndarray) -> np.ndarray:
    """Pillow's first LANCZOS pass over views laid side by side: (H, c, W) -> (A, c, B), float32 bytes.

    Horizontal first gives (H, c, 32), vertical first (32, c, W). Row h of every view is contiguous, so
    the pass is a few matrix products over all c views. A side that is already 32 is skipped, as in Pillow.
    """
    height, c, width = gray.shape
    if _horizontal_first(height, width):
        if width == IMG_SIZE:
            return gray
        return _horizontal_pass(gray.reshape(height * c, width)).reshape(height, c, IMG_SIZE)
    return _vertical_pass(gray.reshape(height, c * width)).reshape(IMG_SIZE, c, width)


def _second_pass(mid: np.ndarray, height: int, width: int) -> np.ndarray:
    """The other pass, over the first pass's output for views of ``height`` x ``width``.  # (32, c, 32)"""
    _, c, _ = mid.shape
    if _horizontal_first(height, width):
        if height == IMG_SIZE:
            return mid
        return _vertical_pass(mid.reshape(height, c * IMG_SIZE)).reshape(IMG_SIZE, c, IMG_SIZE)
    if width == IMG_SIZE:
        return mid
    return _horizontal_pass(mid.reshape(IMG_SIZE * c, width)).reshape(IMG_SIZE, c, IMG_SIZE)


def _resize(gray: np.ndarray) -> np.ndarray:
    """Pillow's LANCZOS resize to 32x32 of views laid side by side: (H, c, W) -> (32, c, 32), float32 bytes."""
    return _second_pass(_first_pass(gray), gray.shape[0], gray.shape[2])


def _gray(chunk: np.ndarray, planes_buf: np.ndarray, gray_buf: np.ndarray) -> np.ndarray:
    """Pillow's ``convert('L')`` of c views, laid side by side row by row.  # (H, c, W) float32 bytes"""
    c, height, width = chunk.shape[:3]
    gray = gray_buf[:height * c * width].reshape(height, c, width)
    if chunk.ndim == 3:
        np.copyto(gray, chunk.transpose(1, 0, 2))
        return gray
    planes = planes_buf[:height * c * width * 3].reshape(height, c, width, 3)  # (H, c, W, 3)
    np.copyto(planes, chunk.transpose(1, 0, 2, 3))
    np.matmul(planes, _GRAY_WEIGHTS, out=gray)  # L24 / 2**16, exact in float32
    gray += 0.5
    return np.floor(gray, out=gray)  # (L24 + 0x8000) >> 16


def _low_frequencies(views: np.ndarray) -> np.ndarray:
    """imagehash's ``dct[:8, :8]`` of every view's 32x32 LANCZOS thumbnail, row-major.  # (N, 64) float64

    Grayscale and the first pass go a chunk of views at a time, so their float copies stay in cache;
    the small second pass and the DCT go a group of chunks at a time, so their per-call overhead is
    shared by many views. All buffers are reused: nothing large is allocated (and page-faulted) per view.
    """
    n, height, width = views.shape[:3]
    per_chunk = max(1, min(n, _CHUNK_PIXELS // (height * width)))
    per_group = min(n, per_chunk * max(1, _GROUP_VIEWS // per_chunk))
    planes_buf = np.empty(height * per_chunk * width * 3 if views.ndim == 4 else 0, dtype=np.float32)
    gray_buf = np.empty(height * per_chunk * width, dtype=np.float32)
    sides = (height, IMG_SIZE) if _horizontal_first(height, width) else (IMG_SIZE, width)
    mid = np.empty((sides[0], per_group, sides[1]), dtype=np.float32)  # (A, group, B): first pass outputs
    low = np.empty((n, HASH_SIZE * HASH_SIZE))  # (N, 64)
    for start in range(0, n, per_group):
        group = views[start:start + per_group]
        g = len(group)
        for offset in range(0, g, per_chunk):
            chunk = group[offset:offset + per_chunk]
            mid[:, offset:offset + len(chunk)] = _first_pass(_gray(chunk, planes_buf, gray_buf))
        first = mid if g == per_group else np.ascontiguousarray(mid[:, :g])
        thumbs = _second_pass(first, height, width).transpose(1, 0, 2).astype(np.float64)  # (g, 32, 32)
        # The same scipy.fftpack calls as imagehash, batched along axis 0: the floats come out identical.
        rows = scipy.fftpack.dct(thumbs, axis=1, overwrite_x=True)[:, :HASH_SIZE]  # (g, 8, 32)
        block = scipy.fftpack.dct(rows, axis=2)[:, :, :HASH_SIZE]  # (g, 8, 8)
        low[start:start + g] = block.reshape(g, HASH_SIZE * HASH_SIZE)
    return low


def _check_views(views: np.ndarray) -> np.ndarray:
    views = np.asarray(views)
    if views.dtype != np.uint8:
        raise ValueError(f"views must be uint8, got {views.dtype}")
    if not (views.ndim == 3 or (views.ndim == 4 and views.shape[-1] == 3)):
        raise ValueError(f"views must be (N, H, W, 3) RGB or (N, H, W) gray, got shape {views.shape}")
    if views.shape[1] < 1 or views.shape[2] < 1:
        raise ValueError(f"views must be at least 1x1 pixel, got shape {views.shape}")
    return views


def _codes(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bool, row-major over the 8x8 block -> (N,) uint64 with the first bit most significant."""
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def phash_batch(views: np.ndarray) -> np.ndarray:
    """``imagehash.phash`` of every view as a 64-bit code: ``int(str(imagehash.phash(img)), 16) == code``.

    ``views`` is (N, H, W, 3) uint8 RGB or (N, H, W) uint8 gray, all of one size, e.g. the output of
    :func:`dynrefer.views.crop_views`. The codes are the same bits as imagehash's, computed for the whole
    batch at once instead of through PIL one view at a time.  # (N,) uint64
    """
    views = _check_views(views)
    n = len(views)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    low = _low_frequencies(views)  # (N, 64)
    return _codes(low > np.median(low, axis=1)[:, None])


def _pixels(image: np.ndarray | Image.Image) -> np.ndarray:
    """One view as the uint8 array whose grayscale equals ``image.convert('L')``.  # (H, W, 3) or (H, W)"""
    if isinstance(image, Image.Image):
        if image.mode in ("L", "RGB"):
            return np.asarray(image)
        if image.mode in ("RGBA", "P"):
            # Pillow's RGBA->L ignores alpha and P->L greys the palette colour: both are RGB->L.
            return np.asarray(image.convert("RGB"))
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            # I16 -> L saturates: any value with a high byte becomes 255.
            return np.minimum(np.asarray(image), 255).astype(np.uint8)
        return np.asarray(image.convert("L"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"a view must be (H, W, 3) or (H, W) uint8, got {array.dtype} {array.shape}")
    return array


def phash_images(images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    """:func:`phash_batch` for views of different sizes and kinds, as ``imagehash.phash`` on each.  # (N,) uint64

    Arrays are (H, W, 3) RGB or (H, W) gray uint8; PIL images of mode L, RGB, RGBA, P or I;16 are reduced
    to what their ``convert('L')`` sees (other modes go through ``convert('L')`` itself). Views are grouped
    by size and kind, and each group is hashed as one batch.
    """
    pixels = [_pixels(image) for image in images]
    codes = np.zeros(len(pixels), dtype=np.uint64)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, array in enumerate(pixels):
        groups.setdefault(array.shape, []).append(i)
    for members in groups.values():
        codes[members] = phash_batch(np.stack([pixels[i] for i in members]))
    return codes


def phash_official(views: np.ndarray) -> np.ndarray:
    """The official DynRefer code's hash: gray, 224x224, 2-D DCT of it all, 8x8 block above its mean.  # (N,) uint64

    Not imagehash's phash: the official code takes the 8x8 corner of the orthonormal DCT-II of the whole
    224x224 view (``cv2.dct``) and thresholds at the mean. Grayscale uses OpenCV's fixed-point BT.601
    weights; views of another size are resized as OpenCV's INTER_LINEAR. The official code hashes the
    full-resolution crop, not the resized view: :func:`phash_official_crops` does that.
    """
    views = _check_views(views)
    n = len(views)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    gray = official_gray(views) if views.ndim == 4 else views.astype(np.float32)  # (N, H, W)
    h, w = gray.shape[1:]
    return np.concatenate([phash_official_crops(g, np.array([[0, 0, w, h]])) for g in gray])


def official_gray(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image's grey levels as OpenCV's RGB2GRAY gives them (fixed-point BT.601, rounded).  # (H, W) float32"""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return np.floor(rgb.astype(np.float32) @ _OFFICIAL_GRAY_WEIGHTS + np.float32(0.5))


@functools.lru_cache(maxsize=256)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR resampling along one axis as a matrix: output i reads source ``(i + 0.5) * in/out
    - 0.5`` from its two neighbours, clamped at the borders (no antialiasing).  # (out, in)"""
    x = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    lo = np.floor(x)
    frac = x - lo
    lo = lo.astype(np.int64)
    frac[lo < 0], lo[lo < 0] = 0.0, 0
    frac[lo >= in_size - 1], lo[lo >= in_size - 1] = 0.0, in_size - 1
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, np.minimum(lo + 1, in_size - 1)), frac)
    return m


def phash_official_crops(gray: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The official code's hash of each view box: its full-resolution grey crop, resized bilinearly to 224, the
    8x8 corner of its orthonormal 2-D DCT, bits above their mean.  # (T,) uint64

    gray: the image's :func:`official_gray` (H, W); boxes: (T, 4) integer crop boxes. Computed in float64
    (OpenCV: float32), so a bit that sits right at the mean can differ from OpenCV's.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    basis = _dct_basis(OFFICIAL_SIZE)  # (8, 224)
    low = np.empty((len(boxes), HASH_SIZE * HASH_SIZE))
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        crop = gray[y1:y2, x1:x2].astype(np.float64)
        if crop.size == 0:
            raise ValueError(f"view box {[x1, y1, x2, y2]} is empty")
        resized = _bilinear_matrix(y2 - y1, OFFICIAL_SIZE) @ crop @ _bilinear_matrix(x2 - x1, OFFICIAL_SIZE).T
        low[i] = (basis @ resized @ basis.T).reshape(-1)
    return _codes(low > low.mean(axis=1)[:, None])


@functools.lru_cache(maxsize=4)
def _dct_basis(size: int) -> np.ndarray:
    """The first 8 rows of the orthonormal DCT-II matrix of ``size`` points.  # (8, size)"""
    k = np.arange(HASH_SIZE)[:, None]
    x = np.arange(size)[None, :]
    basis = np.cos(np.pi * (2 * x + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    basis[0] /= math.sqrt(2.0)
    basis.flags.writeable = False
    return basis


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between 64-bit codes, elementwise with broadcasting: imagehash's ``h1 - h2``.  # int64"""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.bitwise_count(x).astype(np.int64)


def select_views(codes: np.ndarray, ts: Sequence[float], n: int) -> list[int]:
    """DynRefer's greedy view choice: the region view plus the ``n - 1`` candidates that differ most per unit t.

    ``codes[0]``/``ts[0]`` are the region view (t=0); the rest are candidates with t > 0, scored by
    ``hamming(codes[0], codes[i]) / ts[i]``. The top ``n - 1`` scores win, ties going to the smaller t and
    then the earlier index, so the choice is deterministic. Returns indices into ``codes``: 0, then the chosen
    ones in pick order (best first), the order in which the official code feeds them to the model.
    """
    codes = np.asarray(codes, dtype=np.uint64).reshape(-1)
    t = np.asarray(ts, dtype=np.float64).reshape(-1)
    if len(codes) != len(t):
        raise ValueError(f"got {len(codes)} codes but {len(t)} view coefficients; need one t per view")
    if len(codes) == 0 or t[0] != 0.0:
        raise ValueError(f"the first view must be the region view with t=0, got ts={list(ts)!r}")
    if n < 1:
        raise ValueError(f"n={n}: at least the region view must be selected (n >= 1)")
    candidates = t[1:]
    if n - 1 > len(candidates):
        raise ValueError(f"n={n} views requested but only {len(candidates)} candidates besides the region view")
    bad = ~(candidates > 0) | ~np.isfinite(candidates)
    if bad.any():
        raise ValueError(f"candidate views need finite t > 0, got {candidates[bad].tolist()}")
    scores = hamming(codes[0], codes[1:]) / candidates
    index = np.arange(1, len(codes))
    ranked = np.lexsort((index, candidates, -scores))  # by score (high first), then t, then index
    return [0] + index[ranked[:n - 1]].tolist()
