"""Views: crops of an image around a region, from the region itself (t=0) out to the whole image (t=1).

This module is the single place where view boxes are computed; data preparation, training, batch
inference and serving all call it. Boxes are ``(x1, y1, x2, y2)`` in pixels, x2/y2 exclusive.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from dynrefer.imageio import ReducedImage

#: The official candidate coefficients: 0.1, 0.2, ..., 1.0 (t=0 is always kept besides them).
CANDIDATE_TS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))


def validate_box(box: Sequence[float], width: int, height: int, name: str = "box") -> np.ndarray:
    """Return ``box`` clipped to the image as float64, or raise a ValueError that names the box and why."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,):
        raise ValueError(f"{name} {list(box)!r}: expected 4 numbers (x1, y1, x2, y2)")
    if not np.isfinite(b).all():
        raise ValueError(f"{name} {b.tolist()}: not finite")
    x1, y1, x2, y2 = b
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{name} {b.tolist()}: zero or negative area (need x2 > x1 and y2 > y1)")
    clipped = np.array([max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))])
    if clipped[2] - clipped[0] < 1.0 or clipped[3] - clipped[1] < 1.0:
        raise ValueError(
            f"{name} {b.tolist()}: outside the {width}x{height} image (less than 1 px inside after clipping)"
        )
    return clipped


def view_boxes(box: Sequence[float], width: int, height: int, ts: Sequence[float]) -> np.ndarray:
    """Integer crop boxes ``v(t) = b + (I - b) * t`` for each t, clipped to the image.  # (T, 4) int64

    Corners are rounded outwards so the region stays inside every view; views nest as t grows.
    """
    b = validate_box(box, width, height)
    t = np.asarray(ts, dtype=np.float64)
    if t.ndim != 1 or ((t < 0) | (t > 1) | ~np.isfinite(t)).any():
        raise ValueError(f"view coefficients must be a list of numbers in [0, 1], got {list(ts)!r}")
    image = np.array([0.0, 0.0, float(width), float(height)])
    v = b[None, :] + (image - b)[None, :] * t[:, None]  # (T, 4)
    out = np.empty_like(v, dtype=np.int64)
    out[:, :2] = np.floor(v[:, :2] + 1e-6)
    out[:, 2:] = np.ceil(v[:, 2:] - 1e-6)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def region_in_views(box: Sequence[float], views: np.ndarray, size: int) -> np.ndarray:
    """The region box in each view's resized ``size`` x ``size`` pixel frame: the RoI per view.  # (T, 4)"""
    b = np.asarray(box, dtype=np.float64)
    v = np.asarray(views, dtype=np.float64).reshape(-1, 4)
    scale = np.stack([size / (v[:, 2] - v[:, 0]), size / (v[:, 3] - v[:, 1])], axis=1)  # (T, 2)
    origin = v[:, :2]
    rois = np.concatenate([(b[None, :2] - origin) * scale, (b[None, 2:] - origin) * scale], axis=1)
    return rois.clip(0.0, float(size))


def roi_to_image(rois: np.ndarray, views: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`region_in_views`: map RoIs back to image pixels.  # (T, 4)"""
    r = np.asarray(rois, dtype=np.float64).reshape(-1, 4)
    v = np.asarray(views, dtype=np.float64).reshape(-1, 4)
    scale = np.stack([(v[:, 2] - v[:, 0]) / size, (v[:, 3] - v[:, 1]) / size], axis=1)
    return np.concatenate([r[:, :2] * scale + v[:, :2], r[:, 2:] * scale + v[:, :2]], axis=1)


#: Pillow first shrinks a view by an integer factor while it stays this many times larger than the target, then
#: resamples: about 3x faster on large views, within one grey level on average of a direct bicubic resize.
REDUCING_GAP = 2.0


def reduction_factor(boxes: Sequence[Sequence[float]], size: int, gap: float = REDUCING_GAP) -> int:
    """The largest integer factor an image can be decoded smaller by while every view of these (clipped) region
    boxes still spans ``gap`` x ``size`` decoded pixels on its short side: the region itself (t=0) is the smallest
    view, so it decides; resizing to ``size`` then shrinks by ``gap`` at most, as it does from the full image."""
    short = min((min(b[2] - b[0], b[3] - b[1]) for b in boxes), default=0.0)
    return max(1, int(short // (gap * size)))


def crop_unique_views(image: Image.Image | ReducedImage | np.ndarray, boxes: np.ndarray, size: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Cut each distinct box from one decoded RGB image once, resized (bicubic) to ``size``.

    Returns the views (N, size, size, 3) uint8 and, per box, the row of its view (T,) int64: identical boxes
    (the t=1 view is shared by every region of an image) are resized once. Boxes are in original pixels; a
    :class:`ReducedImage` is cut where they fall in its smaller pixels.
    """
    reduced = image if isinstance(image, ReducedImage) else None
    image = reduced.image if reduced is not None else image
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if img.mode != "RGB":
        raise ValueError(f"crop_views expects a decoded RGB image, got mode {img.mode!r}")
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    unique, index = np.unique(boxes, axis=0, return_inverse=True)
    views = np.empty((len(unique), size, size, 3), dtype=np.uint8)
    for i, box in enumerate(unique.tolist()):
        crop = reduced.box(box) if reduced is not None else tuple(box)
        views[i] = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=crop,
                                         reducing_gap=REDUCING_GAP))
    return views, index.reshape(-1).astype(np.int64)


def crop_views(image: Image.Image | ReducedImage | np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut each box from one decoded RGB image, resized (bicubic) to ``size``.  # (T, size, size, 3) uint8"""
    views, index = crop_unique_views(image, boxes, size)
    return views[index]


def region_views(
    image: Image.Image, box: Sequence[float], ts: Sequence[float], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everything one region needs: view boxes (T, 4), RoIs in view frames (T, 4), view pixels (T, S, S, 3)."""
    width, height = image.size
    clipped = validate_box(box, width, height)
    boxes = view_boxes(clipped, width, height, ts)
    return boxes, region_in_views(clipped, boxes, size), crop_views(image, boxes, size)
