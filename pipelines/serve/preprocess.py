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
    source: str = "request"  # "request", "masks", "alpha" (the image's alpha channel) or "proposals"
    mask_ids: list[int | None] = field(default_factory=list)  # the mask each box came from
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


def mask_boxes(masks: list[Any], width: int, height: int, limits: Limits) -> list[list[float]]:
    """Each mask's tight box; a mask that cannot be read, is not the image's size or is empty is a 422."""
    from dynrefer.masks import MaskError, decode_mask
    from dynrefer.predictor import mask_box

    boxes = []
    for i, spec in enumerate(masks):
        name = f"masks[{i}]"
        try:
            mask = decode_mask(spec, name, limits.max_pixels)
        except MaskError as e:
            raise RequestError(422, "bad_mask", str(e)) from None
        if mask.shape != (height, width):
            raise RequestError(422, "bad_mask", f"{name} is {mask.shape[1]}x{mask.shape[0]}; the image is "
                                                f"{width}x{height}")
        if not mask.any():
            raise RequestError(422, "bad_mask", f"{name}: the mask is empty (no pixel set)")
        boxes.append(mask_box(mask, name))
    return boxes


def alpha_box(data: bytes, limits: Limits) -> list[float]:
    """The tight box of the region the image's alpha channel marks (the OpenAI-style region prompt)."""
    from dynrefer.masks import MaskError, alpha_mask
    from dynrefer.predictor import mask_box

    try:
        mask = alpha_mask(data, "image", limits.max_pixels)
    except MaskError as e:
        raise RequestError(422, "bad_image", str(e)) from None
    if mask is None or not mask.any():
        raise RequestError(422, "no_region", "the image marks no region: give it an alpha channel that is opaque "
                                             "(alpha >= 128) over the region and transparent elsewhere, or send "
                                             "'boxes' or 'masks'")
    return mask_box(mask, "image alpha")


def prepare_request(data: bytes, boxes: list[list[float]] | None, texts: list[str], model_cfg: DynReferConfig,
                    mode: str, limits: Limits, proposer: Any = None, dense: Dense | None = None,
                    masks: list[Any] | None = None, alpha: bool = False) -> Prepared:
    """Decode once, then every region's views and pHASH codes and the chosen views' pixels, by the functions batch
    jobs and the Python API use (:func:`dynrefer.predictor.image_inputs`).

    The image's size comes from its header, so the regions are known before any pixel is decoded; given regions
    decode it only as large as their smallest view needs (:func:`dynrefer.views.reduction_factor`), boxes and
    view boxes staying in original pixels.

    Regions are ``boxes``, else each of ``masks``' tight box, else (``alpha``) the box of the image's alpha
    channel, else the proposal model's.
    """
    from dynrefer.imageio import ImageError, decode_image, decode_reduced, probe_size
    from dynrefer.predictor import image_inputs
    from dynrefer.views import reduction_factor

    def bad_image(e: ImageError) -> Prepared:
        return failure(RequestError(image_status(e.reason), "bad_image", str(e), reason=e.reason))

    try:
        width, height = probe_size(data, limits.max_pixels, name="image")
    except ImageError as e:
        return bad_image(e)
    image = None
    scores: list[float | None]
    source, mask_ids = "request", None
    try:
        if masks is not None:
            boxes, source, mask_ids = mask_boxes(masks, width, height, limits), "masks", list(range(len(masks)))
        elif boxes is None and alpha:
            boxes, source = [alpha_box(data, limits)], "alpha"
    except RequestError as e:
        return failure(e)
    if boxes is None:
        if proposer is None:
            return failure(RequestError(422, "bad_box", "boxes: missing"))
        try:
            image = decode_image(data, limits.max_pixels, name="image")
        except ImageError as e:
            return bad_image(e)
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
    if image is None:
        # The official hash reads full-resolution crops, so only the imagehash of the views allows a reduction.
        factor = reduction_factor(clipped, model_cfg.image_size) if model_cfg.views.hash == "imagehash" else 1
        try:
            image = (decode_reduced(data, factor, limits.max_pixels, name="image") if factor > 1
                     else decode_image(data, limits.max_pixels, name="image"))
        except ImageError as e:
            return bad_image(e)
    out = Prepared(width=width, height=height, scores=scores, source=source, texts=texts,
                   mask_ids=mask_ids or [None] * len(clipped))
    if not clipped:
        return out
    inputs = image_inputs(image, clipped, model_cfg, name="request", mode=mode)
    out.boxes = clipped
    out.view_ts = inputs.ts.astype(float).round(6).tolist()
    out.view_boxes = inputs.view_boxes.astype(int).tolist()
    out.inputs = inputs
    return out
