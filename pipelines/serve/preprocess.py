"""Preprocessing one request (the CPU deployment's work): decode the image once, check the boxes against it, and
build the model inputs with the library functions batch jobs use (:func:`dynrefer.predictor.image_inputs`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dynrefer.config import DynReferConfig
from dynrefer.proposal_filter import keep_proposals
from dynrefer.views import validate_box

from .config import Dense, Limits
from .errors import RequestError

if TYPE_CHECKING:
    from dynrefer.batching import ModelInputs


@dataclass
class Prepared:
    """One request's regions ready for the model, or why it cannot be served (``failure``)."""

    width: int = 0
    height: int = 0
    boxes: list[list[float]] = field(default_factory=list)  # clipped to the image
    scores: list[float | None] = field(default_factory=list)  # proposal scores (dense without boxes)
    source: str = "request"  # "request" or "proposals"
    texts: list[str] = field(default_factory=list)
    view_ts: list[list[float]] = field(default_factory=list)
    view_boxes: list[list[list[int]]] = field(default_factory=list)
    inputs: ModelInputs | None = None  # the model inputs: each distinct view once, indexes, RoIs
    failure: dict[str, Any] | None = None  # {"status", "error", "message", ...}

    def without_pixels(self) -> "Prepared":
        return dataclasses.replace(self, inputs=None)


def failure(err: RequestError) -> Prepared:
    return Prepared(failure={"status": err.status, "error": err.error, "message": err.message, **err.extra})


def image_status(reason: str) -> int:
    """413 for images over the pixel limit, 422 for every other unusable image."""
    return 413 if reason == "too_large" else 422


def prepare_request(data: bytes, boxes: list[list[float]] | None, texts: list[str], model_cfg: DynReferConfig,
                    mode: str, limits: Limits, proposer: Any = None, dense: Dense | None = None) -> Prepared:
    """Decode once, then every region's views and pHASH codes and the chosen views' pixels, by the functions batch
    jobs and the Python API use (:func:`dynrefer.predictor.image_inputs`)."""
    from dynrefer.imageio import ImageError, decode_image
    from dynrefer.predictor import image_inputs

    try:
        image = decode_image(data, limits.max_pixels, name="image")
    except ImageError as e:
        return failure(RequestError(image_status(e.reason), "bad_image", str(e), reason=e.reason))
    width, height = image.size
    scores: list[float | None]
    source = "request"
    if boxes is None:
        if proposer is None:
            return failure(RequestError(422, "bad_box", "boxes: missing"))
        dense = dense or Dense()
        kept = keep_proposals(proposer.propose(image), width, height, dense.min_score,
                              min(dense.max_regions, limits.max_boxes))
        boxes, scores, source = [b for b, _ in kept], [s for _, s in kept], "proposals"
    else:
        scores = [None] * len(boxes)
    clipped, bad = [], []
    for i, b in enumerate(boxes):
        try:
            clipped.append(validate_box(b, width, height, name=f"boxes[{i}]").tolist())
        except ValueError as e:
            bad.append({"index": i, "message": str(e)})
    if bad:
        return failure(RequestError(422, "bad_box", bad[0]["message"] + (f" (and {len(bad) - 1} more)"
                                                                           if len(bad) > 1 else ""), details=bad))
    out = Prepared(width=width, height=height, scores=scores, source=source, texts=texts)
    if not clipped:
        return out
    inputs = image_inputs(image, clipped, model_cfg, name="request", mode=mode)
    out.boxes = clipped
    out.view_ts = inputs.ts.astype(float).round(6).tolist()
    out.view_boxes = inputs.view_boxes.astype(int).tolist()
    out.inputs = inputs
    return out
