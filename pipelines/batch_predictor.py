"""Ray Data callables over :func:`dynrefer.load`'s Predictor, each actor loading the model once.

:class:`DynReferPredictor` is for users' own pipelines (one region per row: an image and a box);
:class:`CaptionModel` is the caption job's model stage (chunks of inputs the CPU stage already built). Both hand
their regions to :meth:`dynrefer.predictor.Predictor.predict_inputs`, so that they caption exactly as the Python
API and Serve do.
"""

from __future__ import annotations

import json
import math
from typing import Any, Hashable, Sequence

import numpy as np

from dynrefer.config import _build
from dynrefer.predictor import Predictor, Region
from pipelines.caption_job import CaptionJob


def load_predictor(model: str, device: str | None = None, storage_options: dict[str, Any] | None = None,
                   max_regions: int = 64) -> Predictor:
    """``dynrefer.load(model)`` on ``device`` (default: the GPU when there is one)."""
    import torch

    import dynrefer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dynrefer.load(model, device=device, storage_options=storage_options or None, max_regions=max_regions)


def region_fields(region: Region | None) -> dict[str, Any]:
    """What the model says about one region in the caption output's fields (score maps as dicts); ``None``, a
    region that reached no model, gets the empty answer."""
    if region is None:
        return {"caption": "", "caption_score": None, "tags": [], "tag_scores": [], "category": None,
                "category_score": None, "category_scores": None, "attributes": [], "attribute_scores": None}
    return {"caption": region.caption,
            "caption_score": None if region.caption_score is None else float(region.caption_score),
            "tags": [t for t, _ in region.tags], "tag_scores": [float(s) for _, s in region.tags],
            "category": region.category,
            "category_score": None if region.category_score is None else float(region.category_score),
            "category_scores": region.category_scores, "attributes": [a for a, _ in region.attributes],
            "attribute_scores": region.attribute_scores}


def _column(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


class CaptionModel:
    """The caption job's model stage: every chunk's regions predicted together, one output row (JSON text in the
    output schema) per region, each with its shard's bookkeeping; regions without inputs reach no model."""

    def __init__(self, job: dict[str, Any]):
        import torch

        from dynrefer.batching import ModelInputs

        self.job = _build(CaptionJob, job, "job")
        self.inputs = ModelInputs.from_bytes
        gpu = self.job.gpus_per_actor > 0 and torch.cuda.is_available()
        self.predictor = load_predictor(self.job.model, "cuda" if gpu else "cpu", self.job.storage_options,
                                        max_regions=self.job.batch_size)
        self.num_views = self.predictor.model.cfg.views.num_views

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks = [(json.loads(regions), self.inputs(bytes(blob)) if len(blob) else None)
                  for regions, blob in zip(batch["regions"], batch["inputs"])]
        predicted = iter(self.predictor.predict_inputs([inputs for _, inputs in chunks if inputs is not None]))
        shards, totals, rows = [], [], []
        for i, (regions, inputs) in enumerate(chunks):
            view_ts = inputs.ts.tolist() if inputs is not None else [[0.0] * self.num_views] * len(regions)
            for meta, ts in zip(regions, view_ts):
                error, reason = meta.pop("error"), meta.pop("reason")
                fields = region_fields(next(predicted) if inputs is not None else None)
                rows.append(json.dumps({**meta, **fields, "view_ts": ts, "error": error, "reason": reason}))
                shards.append(int(batch["shard"][i]))
                totals.append(int(batch["shard_total"][i]))
        return {"shard": np.array(shards, dtype=np.int64), "shard_total": np.array(totals, dtype=np.int64),
                "row": _column(rows)}


class DynReferPredictor:
    """Captions for a Ray Data dataset of regions, one per row: ``image`` (a local or s3:// path, encoded bytes or
    an (H, W, 3) array) and ``box`` (``[x1, y1, x2, y2]`` in pixels)::

        ds.map_batches(DynReferPredictor, fn_constructor_kwargs={"model": EXPORT}, batch_size=64,
                       compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1)

    Every input column passes through; added are ``caption``, ``caption_score``, ``tags``, ``tag_scores``,
    ``category``, ``category_score``, ``attributes``, ``view_ts``, ``error`` and its ``reason`` code (as the caption
    job's error rows: the image's ``ImageError`` reason, ``missing``, ``read_error`` or ``bad_box``), with
    ``category_scores`` and
    ``attribute_scores`` as JSON text (Arrow has no column for a map that may be empty). Rows of one image in a
    batch share its decoding and its identical views. A row whose image cannot be read or whose box is unusable
    gets the reason in ``error`` and no caption; the rest of the batch is captioned.
    """

    def __init__(self, model: str, device: str | None = None, views: str | None = None,
                 storage_options: dict[str, Any] | None = None, max_regions: int = 64):
        self.predictor = load_predictor(model, device, storage_options, max_regions)
        self.views = views  # "phash" or "fixed"; None: the model config's own selection
        self.storage_options = storage_options or None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dynrefer.imageio import ImageError
        from dynrefer.predictor import image_inputs, to_image

        n = len(batch["image"])
        boxes = [[float(v) for v in box] for box in batch["box"]]
        errors: list[str | None] = [None] * n
        reasons: list[str | None] = [None] * n
        built, owners = [], []  # ModelInputs, and the rows each one's regions are
        for rows in _by_image(batch["image"]).values():
            try:
                image = to_image(batch["image"][rows[0]], storage_options=self.storage_options)
            except (ValueError, OSError) as e:
                reason = (e.reason if isinstance(e, ImageError) else "missing" if isinstance(e, FileNotFoundError)
                          else "read_error" if isinstance(e, OSError) else "bad_image")
                for i in rows:
                    errors[i], reasons[i] = str(e), reason
                continue
            try:  # all boxes of the image in one input, else each alone so that a bad box fails only its row
                pieces = [(image_inputs(image, [boxes[i] for i in rows], self.predictor.model, mode=self.views),
                           rows)]
            except ValueError:
                pieces = [piece for i in rows for piece in self._one(image, boxes, i, errors, reasons)]
            for inputs, group in pieces:
                built.append(inputs)
                owners += group
        regions: list[Region | None] = [None] * n
        for i, region in zip(owners, self.predictor.predict_inputs(built)):
            regions[i] = region
        return {**batch, **_prediction_columns(regions), "error": _column(errors), "reason": _column(reasons)}

    def _one(self, image: Any, boxes: list[list[float]], i: int, errors: list[str | None],
             reasons: list[str | None]) -> list[Any]:
        from dynrefer.predictor import image_inputs

        try:
            return [(image_inputs(image, [boxes[i]], self.predictor.model, mode=self.views), [i])]
        except ValueError as e:
            errors[i], reasons[i] = str(e), "bad_box"
            return []


def _by_image(images: Sequence[Any]) -> dict[Hashable, list[int]]:
    """Row indices per distinct image: a path or encoded bytes by value, an array by row."""
    groups: dict[Hashable, list[int]] = {}
    for i, image in enumerate(images):
        key = image if isinstance(image, (str, bytes)) else ("row", i)
        groups.setdefault(key, []).append(i)
    return groups


def _prediction_columns(regions: Sequence[Region | None]) -> dict[str, np.ndarray]:
    fields = [region_fields(r) for r in regions]

    def number(value: float | None) -> float:
        return math.nan if value is None else value

    return {"caption": _column([f["caption"] for f in fields]),
            "caption_score": np.array([number(f["caption_score"]) for f in fields], dtype=np.float64),
            "tags": _column([f["tags"] for f in fields]), "tag_scores": _column([f["tag_scores"] for f in fields]),
            "category": _column([f["category"] for f in fields]),
            "category_score": np.array([number(f["category_score"]) for f in fields], dtype=np.float64),
            "category_scores": _column([json.dumps(f["category_scores"]) for f in fields]),
            "attributes": _column([f["attributes"] for f in fields]),
            "attribute_scores": _column([json.dumps(f["attribute_scores"]) for f in fields]),
            "view_ts": _column([[v.t for v in r.views] if r is not None else [] for r in regions])}
