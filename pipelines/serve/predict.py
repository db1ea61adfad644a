"""The model call (the Predictor deployment's work): one forward for many requests' regions, and the results as
plain data (so the ingress never imports torch)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from dynrefer.config import DynReferConfig

from .preprocess import Prepared


def predict_items(model: Any, items: Sequence[Prepared], max_regions: int) -> list[list[Any]]:
    """:class:`dynrefer.predictor.Region` lists per item from one pass of the library's predictor over all their
    regions (forwards of at most ``max_regions``); ``model`` is a DynRefer or a ``dynrefer.predictor.Predictor``.

    Texts of all items are scored together (each text query is scored on its own, so this equals per-item
    scoring) and each item gets back only its own texts.
    """
    from dynrefer.predictor import Predictor

    api = model if isinstance(model, Predictor) else Predictor(model, max_regions=max_regions)
    live = [it for it in items if it.failure is None and it.boxes]
    texts = list(dict.fromkeys(t for it in live for t in it.texts))
    regions = api.predict_inputs([it.inputs for it in live], texts)
    out, k = [], 0
    for it in items:
        n = len(it.boxes) if it.failure is None else 0
        out.append([dataclasses.replace(r, text_scores={t: r.text_scores[t] for t in it.texts})
                    for r in regions[k: k + n]])
        k += n
    return out


@dataclass
class BatchStats:
    """What the batcher did on one replica: how many requests shared each forward."""

    sizes: Counter = field(default_factory=Counter)
    regions: int = 0

    def record(self, requests: int, regions: int) -> None:
        self.sizes[requests] += 1
        self.regions += regions

    def summary(self) -> dict[str, Any]:
        return {"forwards": sum(self.sizes.values()), "requests": sum(k * v for k, v in self.sizes.items()),
                "regions": self.regions, "max_requests_per_forward": max(self.sizes, default=0),
                "requests_per_forward": {str(k): v for k, v in sorted(self.sizes.items())}}


def parameter_summary(model: Any) -> dict[str, int]:
    """Total and trainable parameters, and per top-level component (the embedding without the encoder it shares)."""
    from dynrefer.model import parameter_counts

    total, trainable = parameter_counts(model)
    out = {"total": total, "trainable": trainable}
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    for name, child in model.named_children():
        params = {id(p): p for p in child.parameters()}
        if name != "encoder":
            params = {k: p for k, p in params.items() if k not in encoder_ids}
        out[name] = sum(p.numel() for p in params.values())
    return out


def config_summary(cfg: DynReferConfig) -> dict[str, Any]:
    """The model config with its word lists replaced by their sizes."""
    d = cfg.to_dict()
    d["tags"]["vocabulary_size"] = len(d["tags"].pop("vocabulary") or [])
    words = d["language"].pop("vocabulary")
    d["language"]["vocabulary_size"] = None if words is None else len(words)
    return d



def recognition_results(region: Any, has_attributes: bool) -> dict[str, Any]:
    """``category`` and ``attributes`` of a Region; null where the model names no such labels (``has_attributes``:
    whether it names attributes, so that none over the threshold is ``[]``, not null)."""
    category = None if region.category is None else {"name": region.category,
                                                      "score": round(region.category_score, 6)}
    return {"category": category,
            "attributes": [{"name": a, "score": round(s, 6)} for a, s in region.attributes] if has_attributes
            else None}


def region_results(prepared: Prepared, regions: Sequence[Any], has_attributes: bool) -> list[dict[str, Any]]:
    """The response's regions (plain data) from a request's Regions, in request order."""
    return [{"index": i, "box": [round(v, 2) for v in box], "score": score, "caption": r.caption,
             "caption_score": None if r.caption_score is None else round(float(r.caption_score), 6),
             "tags": [{"tag": t, "score": round(s, 4)} for t, s in r.tags],
             "text_scores": {t: round(s, 6) for t, s in r.text_scores.items()},
             **recognition_results(r, has_attributes),
             "views": [{"t": t, "box": b} for t, b in zip(ts, vb)], "mask_id": mask_id}
            for i, (box, score, r, ts, vb, mask_id) in enumerate(zip(
                prepared.boxes, prepared.scores, regions, prepared.view_ts, prepared.view_boxes,
                prepared.mask_ids or [None] * len(prepared.boxes)))]


@dataclass
class Answer:
    """What the Predictor returns for one request."""

    prepared: Prepared  # without pixels
    regions: list[dict[str, Any]]  # region_results: plain data, so the ingress never imports torch
    batch_requests: int = 0
    batch_regions: int = 0
    replica: str = ""

