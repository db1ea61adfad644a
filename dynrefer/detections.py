"""A detector's COCO-format detections file as the regions to caption: validated entry by entry (a malformed entry
is an error row, not a failed job), then cut per image by score and count."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterator, Sequence

from dynrefer import datasets, storage


def select_regions(candidates: Sequence[dict[str, Any]], min_score: float, max_regions: int) -> list[dict[str, Any]]:
    """The best ``max_regions`` candidate regions (each with a ``score``) scoring at least ``min_score``."""
    kept = [c for c in candidates if c["score"] >= min_score]
    return sorted(kept, key=lambda c: -c["score"])[:max_regions]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _detection_problem(entry: Any, known: set[str]) -> str | None:
    """Why a detections entry cannot be used, or None."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    if not isinstance(entry.get("image_id"), (int, str)) or isinstance(entry.get("image_id"), bool):
        return f"'image_id' must be an integer or string, got {entry.get('image_id')!r}"
    if str(entry["image_id"]) not in known:
        return f"image_id {entry['image_id']!r} is not among the images"
    bbox = entry.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
        return f"'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"'bbox' {bbox} has zero or negative width or height"
    if not _number(entry.get("score")):
        return f"'score' must be a finite number, got {entry.get('score')!r}"
    if "category_id" in entry and not isinstance(entry["category_id"], (int, str)):
        return f"'category_id' must be an integer or string, got {entry['category_id']!r}"
    return None


def attach_detections(records: list[dict[str, Any]], detections: Any, uri: str, min_score: float,
                      max_regions: int) -> list[dict[str, Any]]:
    """Give each image record the regions its detections name (best first, after ``min_score`` and
    ``max_regions``); returns an error row per malformed entry, naming it (region id ``det-<entry index>``).

    ``detections`` is the parsed list or an iterator over its entries (the file streamed, as :func:`read_detections`
    reads it), so that the driver holds the regions kept rather than the whole file."""
    if not isinstance(detections, (list, Iterator)):
        raise ValueError(f"{uri}: expected a JSON list of detections, got {type(detections).__name__}")
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    errors = []
    known = {r["image_id"] for r in records}
    for i, entry in enumerate(detections):
        problem = _detection_problem(entry, known)
        if problem:
            image_id = entry.get("image_id") if isinstance(entry, dict) else None
            errors.append({"image_id": None if image_id is None else str(image_id), "region_id": f"det-{i}",
                           "reason": "bad_detection", "message": f"{uri}[{i}]: {problem}"})
            continue
        x, y, w, h = (float(v) for v in entry["bbox"])
        category = entry.get("category_id")
        by_image[str(entry["image_id"])].append({
            "region_id": f"{entry['image_id']}-det{i}", "box": [x, y, x + w, y + h], "score": float(entry["score"]),
            "detection_category_id": None if category is None else str(category)})
    for record in records:
        record["regions"] = select_regions(by_image.get(record["image_id"], []), min_score, max_regions)
    return errors


def read_detections(records: list[dict[str, Any]], uri: str, min_score: float, max_regions: int,
                    storage_options: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """:func:`attach_detections` of the detections file at ``uri``, streamed entry by entry."""
    try:
        return attach_detections(records, datasets.iter_json_array(uri, storage_options), uri, min_score,
                                 max_regions)
    except ValueError as e:
        if "expected a list" not in str(e):
            raise
        raise ValueError(f"{uri}: expected a JSON list of detections ({e})") from None
