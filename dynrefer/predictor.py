"""The Python API: ``dynrefer.load`` gives a :class:`Predictor` that captions regions of ordinary images.

    import dynrefer
    model = dynrefer.load("demo/runs/tiny/export", device="cpu")       # an export, local or s3://
    preds = model.caption(image, boxes=[[x1, y1, x2, y2], ...])        # PIL image, ndarray, path or bytes
    preds = model.caption(image, masks=[mask, ...])                    # binary masks -> their tight boxes
    preds = model.caption(image, masks=[{"size": [h, w], "counts": "..."}])  # COCO RLE, PNG bytes or base64 too
    dense = dynrefer.load(export, proposals="demo/runs/proposals/export").dense(image)

Every prediction is a :class:`Region`. Regions of one image share its decoded pixels and its identical views;
the views, their pHASH codes and the model inputs are made by the same functions batch jobs and Serve use
(:func:`dynrefer.preprocess.region_rows`, :func:`dynrefer.batching.build_inputs`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from dynrefer import storage
from dynrefer.batching import ModelInputs, build_inputs
from dynrefer.config import DynReferConfig
from dynrefer.imageio import ImageError, ReducedImage, decode_image, to_rgb
from dynrefer.model import DynRefer, RegionPrediction
from dynrefer.preprocess import PrepareConfig, region_rows

ImageLike = Image.Image | np.ndarray | bytes | str | os.PathLike


@dataclass
class View:
    t: float
    box: list[int]  # the crop in image pixels (x1, y1, x2, y2)


@dataclass
class Region:
    """One region's prediction: everything the model says about it, and the views it looked through."""

    box: list[float]
    caption: str
    caption_score: float | None
    tags: list[tuple[str, float]]
    category: str | None = None
    category_score: float | None = None
    attributes: list[tuple[str, float]] = field(default_factory=list)
    text_scores: dict[str, float] = field(default_factory=dict)
    views: list[View] = field(default_factory=list)
    mask_id: int | None = None  # the index of the mask the box came from
    score: float | None = None  # the proposal's score, in dense captioning
    category_scores: dict[str, float] | None = None  # every category's score, where the model names categories
    attribute_scores: dict[str, float] | None = None  # every attribute's probability, where it names attributes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_image(image: ImageLike, max_pixels: int = 64_000_000,
             storage_options: storage.StorageOptions | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image (any mode), an (H, W[, C]) array, encoded bytes, or a local or s3:// path;
    bad or oversized input raises :class:`dynrefer.imageio.ImageError` (a ValueError) that says why."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), max_pixels, "image")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return decode_image(storage.read_bytes(path, storage_options), max_pixels, path)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_as_pixels(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image, a numpy array, bytes or a path, got {type(image).__name__}")
    if image.width * image.height > max_pixels:
        raise ImageError("too_large", f"image: {image.width}x{image.height} exceeds the limit of {max_pixels} pixels")
    image.load()
    return to_rgb(image)


def _as_pixels(array: np.ndarray) -> np.ndarray:
    """An array as 8-bit grey, RGB or RGBA pixels."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image array: expected (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        return np.rint(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"image array: expected uint8, uint16, bool or float in [0, 1], got {array.dtype}")
    return array


def mask_box(mask: np.ndarray | Image.Image, name: str = "mask") -> list[float]:
    """The tight box (x1, y1, x2, y2), x2/y2 exclusive, of a binary mask's non-zero pixels."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., -1] if m.shape[2] in (2, 4) else m.max(axis=2)  # alpha channel, or any channel
    if m.ndim != 2:
        raise ValueError(f"{name}: expected an (H, W) binary mask, got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if not len(xs):
        raise ValueError(f"{name}: the mask is empty (no non-zero pixel)")
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def image_inputs(image: Image.Image | ReducedImage, boxes: Sequence[Sequence[float]], model: DynRefer | DynReferConfig,
                 name: str = "image", mode: str | None = None) -> ModelInputs:
    """The model inputs of ``boxes`` on one decoded image; a bad box raises a ValueError naming it. ``model`` may
    be the model's config alone (a CPU preprocessing worker has no weights)."""
    cfg = model if isinstance(model, DynReferConfig) else model.cfg
    prep = PrepareConfig(view_size=cfg.image_size, candidate_ts=list(cfg.views.candidate_ts), hash=cfg.views.hash)
    record = {"image_id": name, "file": name, "regions": [{"region_id": str(i), "box": list(b)}
                                                          for i, b in enumerate(boxes)]}
    rows, errors = region_rows(record, image, prep)
    if errors:
        raise ValueError("; ".join(e["message"] for e in errors))
    return build_inputs(rows, {name: image}, cfg.views, cfg.image_size, mode or cfg.views.selection,
                        prepared_size=prep.view_size)


class Predictor:
    """A loaded model behind ``caption`` and ``dense``; ``max_regions`` bounds one forward pass."""

    def __init__(self, model: DynRefer, proposer: Any = None, max_regions: int = 64,
                 storage_options: storage.StorageOptions | None = None) -> None:
        self.model = model.eval()
        self.proposer = proposer
        self.max_regions = max_regions
        self.storage_options = storage_options

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def caption(self, image: ImageLike, boxes: Sequence[Sequence[float]] | None = None,
                masks: Sequence[Any] | None = None, texts: Sequence[str] | None = None) -> list[Region]:
        """Captions (and tags, category, attributes, text scores) of the given boxes, or of each mask's box."""
        if (boxes is None) == (masks is None):
            raise ValueError("caption: give either boxes or masks")
        mask_ids = None
        if masks is not None:
            boxes = [mask_box(_mask(m, f"masks[{i}]"), f"masks[{i}]") for i, m in enumerate(masks)]
            mask_ids = list(range(len(masks)))
        regions = self.caption_images([(image, boxes)], texts)[0]
        return regions if mask_ids is None else [_with(r, mask_id=i) for r, i in zip(regions, mask_ids)]

    def caption_images(self, items: Sequence[tuple[ImageLike, Sequence[Sequence[float]]]],
                       texts: Sequence[str] | None = None) -> list[list[Region]]:
        """:meth:`caption` for several (image, boxes) pairs, batched together."""
        inputs = [image_inputs(to_image(img, storage_options=self.storage_options), b, self.model, f"image {i}")
                  for i, (img, b) in enumerate(items) if len(b)]
        preds = self._predict(inputs, list(texts or []))
        out, k = [], 0
        for _, boxes in items:
            n = len(boxes)
            out.append(preds[k: k + n])
            k += n
        return out

    def dense(self, image: ImageLike, min_score: float = 0.0, max_regions: int = 100,
              texts: Sequence[str] | None = None) -> list[Region]:
        """Dense captioning: the proposal model's boxes (loaded with ``dynrefer.load(..., proposals=...)``),
        then captions for each, best proposal first."""
        from dynrefer.proposal_filter import keep_proposals

        if self.proposer is None:
            raise ValueError("dense: no proposal model; load with dynrefer.load(model, proposals=EXPORT)")
        img = to_image(image, storage_options=self.storage_options)
        kept = keep_proposals(self.proposer.propose(img), img.width, img.height, min_score, max_regions)
        if not kept:
            return []
        regions = self._predict([image_inputs(img, [b for b, _ in kept], self.model)], list(texts or []))
        return [_with(r, score=s) for r, (_, s) in zip(regions, kept)]

    def predict_inputs(self, inputs: Sequence[ModelInputs], texts: Sequence[str] = ()) -> list[Region]:
        """Regions of already built inputs (:func:`image_inputs`), all in forwards of at most ``max_regions``;
        Serve batches several requests' inputs through here."""
        return self._predict(inputs, list(texts))

    def _predict(self, inputs: Sequence[ModelInputs], texts: list[str]) -> list[Region]:
        from dynrefer.batching import concat_views, take_regions

        if not inputs:
            return []
        views, view_index = concat_views([(x.views, x.view_index) for x in inputs])
        rois = np.concatenate([x.rois for x in inputs])
        ts = np.concatenate([x.ts for x in inputs])
        view_boxes = np.concatenate([x.view_boxes for x in inputs])
        region_boxes = [b for x in inputs for b in _region_boxes(x)]
        preds: list[RegionPrediction] = []
        device = self.device
        for start in range(0, len(rois), self.max_regions):
            chunk = slice(start, start + self.max_regions)
            chunk_views, chunk_index = take_regions(views, view_index, chunk)
            preds += self.model.predict(torch.from_numpy(chunk_views).to(device),
                                        torch.from_numpy(chunk_index).to(device),
                                        torch.from_numpy(rois[chunk]).to(device), texts=texts or None)
        return [_region(p, box, [View(float(t), [int(v) for v in vb]) for t, vb in zip(t_row, vb_row)])
                for p, box, t_row, vb_row in zip(preds, region_boxes, ts.round(6).tolist(), view_boxes.tolist())]


def _region_boxes(inputs: ModelInputs) -> list[list[float]]:
    """Each region's box in image pixels: its t=0 view's RoI mapped back (the clipped box it was given)."""
    from dynrefer.views import roi_to_image

    size = inputs.views.shape[1]
    return [roi_to_image(r[:1], vb[:1], size)[0].round(4).tolist() for r, vb in zip(inputs.rois, inputs.view_boxes)]


def _region(p: RegionPrediction, box: list[float], views: list[View]) -> Region:
    r = p.recognition
    return Region(box=box, caption=p.caption, caption_score=p.caption_score, tags=p.tags,
                  category=r.category if r else None, category_score=r.category_score if r else None,
                  attributes=r.attributes if r else [], text_scores=p.text_scores, views=views,
                  category_scores=r.category_scores if r else None, attribute_scores=r.attribute_scores if r else None)


def _mask(mask: Any, name: str) -> np.ndarray | Image.Image:
    """A mask as given, or decoded when it is PNG bytes, base64 or a COCO RLE (:func:`dynrefer.masks.decode_mask`)."""
    if isinstance(mask, (np.ndarray, Image.Image)):
        return mask
    from dynrefer.masks import decode_mask

    return decode_mask(mask, name)


def _with(region: Region, **changes: Any) -> Region:
    from dataclasses import replace

    return replace(region, **changes)


def load(name_or_path: str, device: str | torch.device = "cpu", proposals: str | None = None,
         storage_options: storage.StorageOptions | None = None, max_regions: int = 64, seed: int = 0) -> Predictor:
    """The one factory: an export directory (``config.json`` + ``model.safetensors``, local or s3://, ours or an
    official conversion), or a model config name or YAML file (``tiny``, ``configs/model/paper.yaml``: random
    weights, seeded, except the parts whose config names a weights path). ``proposals``: a proposal-model export
    for :meth:`Predictor.dense`."""
    from dynrefer.checkpoint import CONFIG_FILE, load_pretrained
    from dynrefer.config import load_config

    if storage.exists(storage.join(name_or_path, CONFIG_FILE), storage_options):
        model = load_pretrained(name_or_path, storage_options, device=device)
    else:
        torch.manual_seed(seed)
        model = DynRefer(load_config(name_or_path), storage_options).to(device)
    proposer = None
    if proposals:
        from dynrefer.proposals import load_proposer

        proposer = load_proposer(proposals, storage_options, device=device)
    return Predictor(model, proposer, max_regions, storage_options)
