"""Per-image preprocessing: decode once, then every region's candidate views, their RoIs and pHASH codes.

One pure function used by data preparation, batch captioning and serving alike. Bad input never raises: each
region comes back either as a row or as an error row with a reason, so counts always add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dynrefer.imageio import ImageError, decode_image
from dynrefer.phash import official_gray, phash_batch, phash_official_crops
from dynrefer.tags import parse_tags
from dynrefer.views import CANDIDATE_TS, crop_views, region_in_views, validate_box, view_boxes


HASHES = ("imagehash", "official")


@dataclass
class PrepareConfig:
    view_size: int = 224  # the encoder's input size: views are hashed (and stored) at this size
    candidate_ts: list[float] = field(default_factory=lambda: list(CANDIDATE_TS))
    max_pixels: int = 64_000_000  # larger images are refused as decompression bombs
    store_views: bool = False  # keep the resized view pixels (uint8, T x S x S x 3) in each row
    hash: str = "imagehash"  # "imagehash" (imagehash.phash of each view) or "official" (the official code's variant)

    def __post_init__(self) -> None:
        if self.hash not in HASHES:
            raise ValueError(f"prepare.hash must be one of {HASHES}, got {self.hash!r}")

    @property
    def ts(self) -> list[float]:
        """t=0 first, then the candidates."""
        return [0.0, *self.candidate_ts]


def error_row(record: dict[str, Any], region: dict[str, Any] | None, stage: str, reason: str,
              message: str) -> dict[str, Any]:
    return {
        "image_id": str(record.get("image_id")), "region_id": None if region is None else str(region.get("region_id")),
        "file": str(record.get("file")), "stage": stage, "reason": reason, "message": message,
    }


def decode_record(record: dict[str, Any], data: bytes | None, cfg: PrepareConfig
                  ) -> tuple[Image.Image | None, list[dict[str, Any]]]:
    """Decode the image of one record; on failure, one error row per region (or one for an image without any)."""
    try:
        if data is None:
            raise ImageError("missing", f"{record.get('file')}: file not found")
        return decode_image(data, max_pixels=cfg.max_pixels, name=str(record.get("file"))), []
    except ImageError as e:
        regions = record.get("regions") or [None]  # an image without regions still gets its error row
        return None, [error_row(record, r, "decode", e.reason, str(e)) for r in regions]


def region_rows(record: dict[str, Any], image: Image.Image, cfg: PrepareConfig
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for every region of one decoded image: views, RoIs and pHASH codes, all views cut and hashed at once."""
    width, height = image.size
    ts = cfg.ts
    rows, errors, all_boxes = [], [], []
    for region in record.get("regions", []):
        name = f"region {region.get('region_id')} of image {record.get('image_id')}"
        try:
            box = validate_box(region.get("box", ()), width, height, name=f"{name}: box")
        except (ValueError, TypeError) as e:
            errors.append(error_row(record, region, "box", "bad_box", str(e)))
            continue
        boxes = view_boxes(box, width, height, ts)  # (T, 4)
        all_boxes.append(boxes)
        caption = region.get("caption")
        rows.append({
            "image_id": str(record["image_id"]), "region_id": str(region["region_id"]), "file": str(record["file"]),
            "width": width, "height": height, "split": record.get("split"),
            "box": box.tolist(), "caption": caption, "captions": list(region.get("captions") or
                                                                     ([caption] if caption else [])),
            "tags": parse_tags(caption) if caption else [], "category": region.get("category"),
            "attributes": list(region.get("attributes") or []),
            "attribute_labels": list(region.get("attribute_labels") or []),
            "ts": ts, "view_boxes": boxes.tolist(), "rois": region_in_views(box, boxes, cfg.view_size).tolist(),
        })
    if rows:
        views = crop_views(image, np.concatenate(all_boxes), cfg.view_size)  # (R*T, S, S, 3)
        if cfg.hash == "official":
            codes = phash_official_crops(official_gray(image), np.concatenate(all_boxes))
        else:
            codes = phash_batch(views)
        codes = codes.reshape(len(rows), len(ts))  # (R, T)
        views = views.reshape(len(rows), len(ts), *views.shape[1:])
        for row, code, pixels in zip(rows, codes, views):
            row["phash"] = code.tolist()
            if cfg.store_views:
                row["views"] = pixels.tobytes()
    return rows, errors


def annotation_errors(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Error rows for what a reader flagged as malformed (``"error"`` on the record or on a region)."""
    if "error" in record:
        return [error_row(record, None, "annotation", "bad_record", record["error"])]
    return [error_row(record, r, "annotation", "bad_record", r["error"]) for r in record.get("regions", [])
            if "error" in r]


def preprocess_image(record: dict[str, Any], data: bytes | None, cfg: PrepareConfig
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, error rows) for one image record and its file's bytes (None when the file is missing)."""
    flagged = annotation_errors(record)
    if "error" in record:
        return [], flagged
    valid = {**record, "regions": [r for r in record.get("regions", []) if "error" not in r]}
    image, errors = decode_record(valid, data, cfg)
    if image is None:
        return [], flagged + errors
    rows, box_errors = region_rows(valid, image, cfg)
    return rows, flagged + box_errors
