"""The caption job's CPU stage: decode a shard's images and cut every region's views into model-input chunks.

A chunk is one Ray Data row: up to ``batch_size`` regions' :class:`dynrefer.batching.ModelInputs` as one blob,
where each image's distinct views travel once (the t=1 view every region of an image shares, say), plus what the
output carries per region as JSON text. A chunk whose regions reach no model (an unreadable image, a bad box)
carries no inputs.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from dynrefer import storage
from dynrefer.batching import build_inputs, load_images
from dynrefer.config import DynReferConfig, _build
from dynrefer.imageio import ImageError
from dynrefer.preprocess import decode_record, error_row, preprocess_image, region_rows
from pipelines.caption_job import CaptionJob, model_config, read_plan, view_config
from pipelines.prepare import read_image_bytes, shard_name


def _column(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _chunk(base: dict[str, Any], regions: list[dict[str, Any]], inputs: bytes) -> dict[str, np.ndarray]:
    return {**{k: np.array([v]) for k, v in base.items()}, "regions": _column([json.dumps(regions)]),
            "inputs": _column([inputs])}


def _optional_box(box: Any) -> list[float] | None:
    """A box as 4 floats, or None where none is known (a box with NaN in it is none)."""
    values = [float(v) for v in box] if box else []
    return values if len(values) == 4 and not any(math.isnan(v) for v in values) else None


def input_chunk(rows: Sequence[dict[str, Any]], images: dict[str, Image.Image], cfg: DynReferConfig,
                job: CaptionJob, prepared_size: int | None, base: dict[str, Any]) -> dict[str, np.ndarray]:
    """Model inputs for region rows in the prepared layout (views, RoIs, chosen t), plus what the output carries."""
    inputs = build_inputs(rows, images, cfg.views, cfg.image_size, job.views, prepared_size=prepared_size)
    regions = [{"image_id": r["image_id"], "region_id": region_id, "box": _optional_box(r["box"]),
                "score": r.get("score"), "detection_category_id": r.get("detection_category_id"), "error": None,
                "reason": None} for r, region_id in zip(rows, inputs.region_ids)]
    return _chunk(base, regions, inputs.to_bytes())


def error_chunk(errors: Sequence[dict[str, Any]], base: dict[str, Any]) -> dict[str, np.ndarray]:
    """Regions that reach no model: ``{"image_id", "region_id", "reason", "message"}`` each, with a box when one is
    known.

    An entry with an empty message is an image without regions: it only tells the driver the image is done."""
    regions = [{"image_id": e["image_id"], "region_id": e["region_id"], "box": _optional_box(e.get("box")),
                "score": e.get("score"), "detection_category_id": e.get("detection_category_id"),
                "error": e["message"] or None, "reason": e.get("reason") if e["message"] else None} for e in errors]
    return _chunk(base, regions, b"")


def shard_inputs(shard: int, job: CaptionJob, cfg: DynReferConfig, prepared_size: int | None
                 ) -> Iterator[dict[str, Any]]:
    """Model-input chunks for one prepared shard; regions whose image cannot be read come out as error rows."""
    so = job.storage_options or None
    fs, path = storage.filesystem(storage.join(job.prepared, "regions", shard_name(shard)), so)
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    if job.split is not None:
        rows = [r for r in rows if r.get("split") == job.split]
    if not rows:  # nothing of the split here: one row that reaches no model marks the shard done
        yield error_chunk([{"image_id": None, "region_id": None, "reason": None, "message": ""}],
                          {"shard": shard, "shard_total": 1})
    base = {"shard": shard, "shard_total": len(rows)}
    for start in range(0, len(rows), job.batch_size):
        chunk = rows[start: start + job.batch_size]
        images, failed = {}, {}
        for file in dict.fromkeys(r["file"] for r in chunk):
            try:
                images.update(load_images([file], so))
            except ImageError as e:
                failed[file] = (e.reason, str(e))
            except FileNotFoundError as e:
                failed[file] = ("missing", f"{file}: file not found ({e})")
            except OSError as e:
                failed[file] = ("read_error", f"{file}: {e}")
        good = [r for r in chunk if r["file"] not in failed]
        if good:
            yield input_chunk(good, images, cfg, job, prepared_size, base)
        bad = [{**r, "reason": failed[r["file"]][0], "message": failed[r["file"]][1]} for r in chunk
               if r["file"] in failed]
        if bad:
            yield error_chunk(bad, base)


def image_shard_inputs(shard: int, records: list[dict[str, Any]], errors: list[dict[str, Any]], job: CaptionJob,
                       cfg: DynReferConfig) -> Iterator[dict[str, Any]]:
    """Model-input chunks for one shard of images with their boxes, through the prepare stage's per-image code;
    every image yields its region rows, its error rows, or one row saying it has no region."""
    so = job.storage_options or None
    prep = view_config(cfg)
    rows, images = [], {}
    errors = list(errors)
    for record in records:
        scored = {r["region_id"]: r for r in record["regions"]}
        if "error" in record:
            found, failed = [], preprocess_image(record, None, prep)[1]
        else:
            try:
                image, failed = decode_record(record, read_image_bytes(record["file"], so), prep)
            except OSError as e:
                image, failed = None, [error_row(record, r, "read", "read_error", str(e))
                                       for r in record["regions"] or [None]]
            found, bad_boxes = region_rows(record, image, prep) if image is not None else ([], [])
            failed += bad_boxes
            if image is not None and found:
                images[record["file"]] = image
        for row in found:
            row.update({k: scored[row["region_id"]][k] for k in ("score", "detection_category_id")})
        rows += found
        errors += [{**scored.get(e["region_id"] or "", {}), "image_id": e["image_id"], "region_id": e["region_id"],
                    "reason": e["reason"], "message": e["message"]} for e in failed]
        if not found and not failed:
            errors.append({"image_id": record["image_id"], "region_id": None, "reason": None, "message": ""})
    base = {"shard": shard, "shard_total": len(rows) + len(errors)}
    for start in range(0, len(rows), job.batch_size):
        yield input_chunk(rows[start: start + job.batch_size], images, cfg, job, cfg.image_size, base)
    if errors:
        yield error_chunk(errors, base)


class ShardInputs:
    """Ray Data CPU stage: a thin callable around :func:`shard_inputs` or :func:`image_shard_inputs`."""

    def __init__(self, job: dict[str, Any]):
        self.job = _build(CaptionJob, job, "job")
        self.cfg = model_config(self.job)
        self.prepared_size = None
        if not self.job.dense:
            manifest = storage.read_json(storage.join(self.job.prepared, "manifest.json"),
                                         self.job.storage_options or None)
            self.prepared_size = manifest["prepare"]["view_size"]

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        for i, shard in enumerate(batch["shard"]):
            if self.job.dense:
                planned = read_plan(str(batch["plan"][i]), self.job.storage_options or None)
                records = json.loads(batch["records"][i]) if "records" in batch else planned["records"]
                yield from image_shard_inputs(int(shard), records, planned["errors"], self.job, self.cfg)
            else:
                yield from shard_inputs(int(shard), self.job, self.cfg, self.prepared_size)
