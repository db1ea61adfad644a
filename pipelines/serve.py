"""Ray Serve application: region captions, tags and text scores over HTTP, with a web page to try it.

Three deployments, each a thin class around the pure functions of this module:

* ``Ingress`` (FastAPI): reads and checks requests (size, content type, fields) and answers in JSON;
* ``Preprocess`` (CPU): decodes the image once, cuts every region's candidate views and hashes them with
  :mod:`dynrefer.preprocess` (the code batch jobs run), then picks the views with
  :func:`dynrefer.batching.build_inputs`; it also runs the proposal model for ``/v1/dense`` when the config has one;
* ``Predictor``: the model, one forward for many requests (``@serve.batch``).

Preprocess hands its arrays straight to the Predictor (a DeploymentResponse passed as an argument), so the pixels
never travel through the ingress. Run it with

    dynrefer serve --config configs/serve/local.yaml
    serve run configs/serve/local.yaml            # or: serve deploy configs/serve/local.yaml

No ``from __future__ import annotations`` here: FastAPI, behind ``serve.ingress``, must see the route annotations
as types (as strings, ``request: Request`` would become a query parameter).
"""

import argparse
import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import math
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser, HeaderParser
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynrefer import storage
from dynrefer.config import DynReferConfig, _build
from dynrefer.proposal_filter import keep_proposals
from dynrefer.views import validate_box

log = logging.getLogger("dynrefer.serve")

# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class Limits:
    """What one request may hold; anything beyond is refused with a 4xx before any work is spent on it."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_boxes: int = 100
    max_texts: int = 64
    max_text_chars: int = 200
    request_timeout_s: float = 60.0  # the ingress's wait on preprocessing + model; then 504


@dataclass
class Batching:
    enabled: bool = True  # False: one request per forward (for comparison; see benchmarks/serve_load.py)
    max_batch_size: int = 8  # requests per forward
    batch_wait_timeout_s: float = 0.02
    max_regions_per_forward: int = 128  # a batch with more regions runs in chunks of this many


@dataclass
class Autoscaling:
    """Ray Serve's ``autoscaling_config``."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0  # must exceed metrics_interval_s (Serve's default 10 s)
    metrics_interval_s: float | None = None  # how often load is reported; short only in benchmarks and tests


@dataclass
class DeploymentSettings:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 16
    autoscaling: Autoscaling = field(default_factory=Autoscaling)


@dataclass
class Dense:
    """How proposals become regions in ``/v1/dense``."""

    min_score: float = 0.3
    max_regions: int = 50


@dataclass
class ServeConfig:
    model: str = ""  # exported model directory (local or s3://), as written by save_pretrained
    views: str | None = None  # "phash" or "fixed"; None: the model config's views.selection
    proposals: str | None = None  # proposal model for /v1/dense (dynrefer.proposals.load_proposer); None: 501
    dense: Dense = field(default_factory=Dense)
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    ingress: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(num_cpus=0.1,
                                                                                    max_ongoing_requests=64))
    preprocess: DeploymentSettings = field(default_factory=DeploymentSettings)
    predictor: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(max_ongoing_requests=32))
    storage_options: dict[str, Any] = field(default_factory=dict)


def parse_config(args: dict[str, Any]) -> ServeConfig:
    """The application's ``args`` as a checked :class:`ServeConfig`; unknown keys and unsafe settings fail."""
    cfg = _build(ServeConfig, dict(args or {}), "serve")
    problems = []
    if not cfg.model:
        problems.append("model: give the exported model directory")
    if cfg.views not in (None, "phash", "fixed"):
        problems.append(f"views: 'phash', 'fixed' or null, got {cfg.views!r}")
    for name in ("max_body_bytes", "max_pixels", "max_boxes", "max_texts", "max_text_chars"):
        if getattr(cfg.limits, name) < 1:
            problems.append(f"limits.{name} must be at least 1")
    if cfg.limits.request_timeout_s <= 0:
        problems.append("limits.request_timeout_s must be positive")
    b = cfg.batching
    if b.max_batch_size < 1 or b.batch_wait_timeout_s < 0 or b.max_regions_per_forward < 1:
        problems.append("batching: max_batch_size and max_regions_per_forward >= 1, batch_wait_timeout_s >= 0")
    if b.enabled and cfg.predictor.max_ongoing_requests < 2 * b.max_batch_size:
        problems.append(f"predictor.max_ongoing_requests ({cfg.predictor.max_ongoing_requests}) must be at least "
                        f"twice batching.max_batch_size ({b.max_batch_size}), or batches never fill")
    for name in ("ingress", "preprocess", "predictor"):
        a = getattr(cfg, name).autoscaling
        if not 1 <= a.min_replicas <= a.max_replicas:
            problems.append(f"{name}.autoscaling: need 1 <= min_replicas <= max_replicas")
    if problems:
        raise ValueError("serve config: " + "; ".join(problems))
    return cfg


def deployment_options(s: DeploymentSettings) -> dict[str, Any]:
    """Keyword arguments for ``Deployment.options``."""
    autoscaling = {k: v for k, v in dataclasses.asdict(s.autoscaling).items() if v is not None}
    return {"ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
            "max_ongoing_requests": s.max_ongoing_requests, "autoscaling_config": autoscaling}


def model_config(cfg: ServeConfig) -> DynReferConfig:
    return DynReferConfig.from_dict(storage.read_json(storage.join(cfg.model, "config.json"),
                                                      cfg.storage_options or None))


# ------------------------------------------------------------------------------------------- request parsing


class RequestError(Exception):
    """A request we refuse: HTTP status, a short code, and a message that says what is wrong."""

    def __init__(self, status: int, error: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.error, self.message, self.extra = status, error, message, extra

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, **self.extra, "request_id": request_id}


@dataclass
class Payload:
    image: bytes
    boxes: list[list[float]] | None  # None: not given
    texts: list[str]


JSON_TYPES = ("application/json",)
MULTIPART_TYPES = ("multipart/form-data",)
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp", "image/tiff", "image/bmp")


def content_type(header: str | None) -> tuple[str, dict[str, str | tuple[str, str, str]]]:
    """(media type, parameters) of a Content-Type header; ("", {}) when absent.

    A parameter written the RFC 2231 way (``boundary*=utf-8''abc``) stays the (charset, language, value) tuple
    the email package parses it into, so that callers can tell it from a plain one and refuse it.
    """
    if not header:
        return "", {}
    msg = HeaderParser().parsestr(f"Content-Type: {header}\r\n\r\n")
    return msg.get_content_type() if msg.get("content-type") else "", dict(msg.get_params()[1:] or [])


#: RFC 2046 section 5.1.1: 1 to 70 characters from this set, not ending in a space.
BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def multipart_boundary(params: dict[str, Any]) -> str:
    """The boundary parameter of a multipart Content-Type, or a 400 saying why it is unusable."""
    boundary = params.get("boundary")
    if isinstance(boundary, tuple):
        raise RequestError(400, "bad_request", "multipart/form-data: the boundary must be a plain parameter "
                                               "(boundary=...), not RFC 2231-encoded (boundary*=...)")
    if not boundary:
        raise RequestError(400, "bad_request", "multipart/form-data without a boundary parameter")
    if not BOUNDARY.fullmatch(boundary):
        raise RequestError(400, "bad_request", f"multipart boundary {clip_text(boundary)!r} is not 1-70 characters "
                                               f"of the set RFC 2046 allows")
    return boundary


def clip_text(value: Any, limit: int = 60) -> str:
    """A client's value as short text for error messages (at most ``limit`` characters, and cheap to make)."""
    text = value if isinstance(value, str) else _short_repr(value, limit)
    return text if len(text) <= limit else text[:limit] + "..."


def _short_repr(value: Any, limit: int) -> str:
    """``repr`` of JSON data, cut early: a client's list may be megabytes long or nested hundreds deep."""
    if isinstance(value, list):
        out = "["
        for i, v in enumerate(value):
            if len(out) > limit:
                return out + "..."
            out += ("" if i == 0 else ", ") + _short_repr(v, limit - len(out))
        return out + "]"
    if isinstance(value, dict):
        return f"{{...{len(value)} keys}}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_content_type(header: str | None) -> str:
    """The media type, or a 415 that lists what is accepted."""
    media, _ = content_type(header)
    if media in JSON_TYPES + MULTIPART_TYPES + IMAGE_TYPES:
        return media
    raise RequestError(415, "unsupported_media_type",
                       f"Content-Type {clip_text(header or '(none)')!r} is not accepted; send application/json "
                       f"(base64 'image'), multipart/form-data (an 'image' file part) or the image bytes as one of "
                       f"{', '.join(IMAGE_TYPES)}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit``: by Content-Length, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "bad_request", f"Content-Length {clip_text(declared)!r} is not a byte count")
        if int(declared) > limit:
            raise RequestError(413, "body_too_large", f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], str | None, bytes]]:
    """Parts of a multipart/form-data body as (disposition parameters, content type, data)."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise RequestError(400, "bad_request", "multipart body is malformed (no closing boundary)")
    parts = []
    for piece in pieces[1:-1]:
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(400, "bad_request", "multipart part without a blank line after its headers")
        headers = BytesHeaderParser().parsebytes(head.lstrip(b" \t").removeprefix(b"\r\n") + b"\r\n\r\n")
        params = dict((headers.get_params(header="content-disposition") or [])[1:])
        parts.append((params, headers.get("content-type"), data))
    return parts


def _json_field(name: str, text: str) -> Any:
    """Parse a client's JSON text; anything the parser refuses (syntax, an integer beyond Python's digit limit,
    nesting deeper than the recursion limit) is a 400."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(400, "bad_request", f"{name}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise RequestError(400, "bad_request", f"{name}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise RequestError(400, "bad_request", f"{name}: JSON value refused ({clip_text(str(e), 120)})") from None


def decode_base64(value: Any) -> bytes:
    """Bytes of a base64 string, with or without a ``data:...;base64,`` prefix."""
    if not isinstance(value, str) or not value:
        raise RequestError(422, "bad_image", "image: expected a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "bad_image", "image: not valid base64") from None


def check_boxes(boxes: Any, limits: Limits) -> list[list[float]] | None:
    """Boxes as lists of 4 numbers (geometry is checked against the image after decoding)."""
    if boxes is None:
        return None
    if not isinstance(boxes, list):
        raise RequestError(422, "bad_box", "boxes: expected a list of [x1, y1, x2, y2]")
    if len(boxes) > limits.max_boxes:
        raise RequestError(422, "too_many_boxes", f"{len(boxes)} boxes; the limit is {limits.max_boxes} per request")
    out = []
    for i, b in enumerate(boxes):
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             for v in b)):
            raise RequestError(422, "bad_box", f"boxes[{i}] {clip_text(b)}: expected 4 numbers (x1, y1, x2, y2)")
        try:
            box = [float(v) for v in b]
        except OverflowError:  # an integer of 309+ digits has no float
            box = [math.inf]
        if not all(map(math.isfinite, box)):
            raise RequestError(422, "bad_box", f"boxes[{i}] {clip_text(b)}: coordinates must be finite numbers of "
                                               f"pixels")
        out.append(box)
    return out


def check_texts(texts: Any, limits: Limits) -> list[str]:
    """Distinct non-empty texts in request order."""
    if texts is None:
        return []
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise RequestError(422, "bad_texts", "texts: expected a list of non-empty strings")
    if len(texts) > limits.max_texts:
        raise RequestError(422, "bad_texts", f"{len(texts)} texts; the limit is {limits.max_texts} per request")
    long = [i for i, t in enumerate(texts) if len(t) > limits.max_text_chars]
    if long:
        raise RequestError(422, "bad_texts", f"texts[{long[0]}] is longer than {limits.max_text_chars} characters")
    return list(dict.fromkeys(t.strip() for t in texts))


def parse_payload(header: str | None, body: bytes, limits: Limits) -> Payload:
    """The image bytes, boxes and texts of a JSON, multipart or raw-image request body."""
    media, params = content_type(header)
    if media in IMAGE_TYPES:
        return Payload(image=body, boxes=None, texts=[])
    if media in JSON_TYPES:
        doc = _json_field("body", body.decode("utf-8", errors="replace"))
        if not isinstance(doc, dict):
            raise RequestError(400, "bad_request", "body: expected a JSON object")
        if "image" not in doc and any(k in doc for k in ("url", "image_url")):
            raise RequestError(422, "url_not_fetched", "this server never fetches URLs; send the image itself "
                                                       "(base64 'image', or a multipart upload)")
        unknown = sorted(set(doc) - {"image", "boxes", "texts"})
        if unknown:
            raise RequestError(422, "bad_request", f"unknown field(s) {unknown}; known: image, boxes, texts")
        if "image" not in doc:
            raise RequestError(422, "bad_image", "image: missing (a base64 string)")
        return Payload(decode_base64(doc["image"]), check_boxes(doc.get("boxes"), limits),
                       check_texts(doc.get("texts"), limits))
    if media in MULTIPART_TYPES:
        fields: dict[str, bytes] = {}
        for disposition, _, data in split_multipart(body, multipart_boundary(params)):
            name = disposition.get("name")
            if name not in ("image", "boxes", "texts"):
                raise RequestError(422, "bad_request", f"unknown form field {clip_text(name)!r}; known: image, "
                                                       f"boxes, texts")
            if name in fields:
                raise RequestError(422, "bad_request", f"form field {name!r} given twice")
            fields[name] = data
        if "image" not in fields:
            raise RequestError(422, "bad_image", "image: missing (a file part named 'image')")
        boxes = _json_field("boxes", fields["boxes"].decode(errors="replace")) if "boxes" in fields else None
        texts = _json_field("texts", fields["texts"].decode(errors="replace")) if "texts" in fields else None
        return Payload(fields["image"], check_boxes(boxes, limits), check_texts(texts, limits))
    raise RequestError(415, "unsupported_media_type", f"Content-Type {clip_text(header)!r} is not accepted")


# --------------------------------------------------------------------------------------------- preprocessing


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
    views: np.ndarray | None = None  # (N, S, S, 3) uint8, each distinct view once
    view_index: np.ndarray | None = None  # (R, V) int64 into views
    rois: np.ndarray | None = None  # (R, V, 4) float32
    failure: dict[str, Any] | None = None  # {"status", "error", "message", ...}

    def without_pixels(self) -> "Prepared":
        return dataclasses.replace(self, views=None, view_index=None, rois=None)


def failure(err: RequestError) -> Prepared:
    return Prepared(failure={"status": err.status, "error": err.error, "message": err.message, **err.extra})


def image_status(reason: str) -> int:
    """413 for images over the pixel limit, 422 for every other unusable image."""
    return 413 if reason == "too_large" else 422


def prepare_request(data: bytes, boxes: list[list[float]] | None, texts: list[str], model_cfg: DynReferConfig,
                    mode: str, limits: Limits, proposer: Any = None, dense: Dense | None = None) -> Prepared:
    """Decode once, then every region's views and pHASH codes (as batch jobs do), then the chosen views' pixels."""
    from dynrefer.batching import build_inputs, choose_views
    from dynrefer.preprocess import PrepareConfig, decode_record, region_rows

    prep = PrepareConfig(view_size=model_cfg.image_size, candidate_ts=list(model_cfg.views.candidate_ts),
                         max_pixels=limits.max_pixels, hash=model_cfg.views.hash)
    record: dict[str, Any] = {"image_id": "request", "file": "request", "regions": []}
    image, errors = decode_record(record, data, prep)
    if image is None:
        e = errors[0]
        return failure(RequestError(image_status(e["reason"]), "bad_image",
                                    "image: " + e["message"].removeprefix("request: "), reason=e["reason"]))
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
    bad = []
    for i, b in enumerate(boxes):
        try:
            validate_box(b, width, height, name=f"boxes[{i}]")
        except ValueError as e:
            bad.append({"index": i, "message": str(e)})
    if bad:
        return failure(RequestError(422, "bad_box", bad[0]["message"] + (f" (and {len(bad) - 1} more)"
                                                                           if len(bad) > 1 else ""), details=bad))
    out = Prepared(width=width, height=height, scores=scores, source=source, texts=texts)
    if not boxes:
        return out
    record["regions"] = [{"region_id": str(i), "box": b} for i, b in enumerate(boxes)]
    rows, errors = region_rows(record, image, prep)
    if errors:
        raise RuntimeError(f"validated boxes refused by region_rows: {errors[0]['message']}")
    inputs = build_inputs(rows, {"request": image}, model_cfg.views, model_cfg.image_size, mode,
                          prepared_size=prep.view_size)
    chosen = [choose_views(r, model_cfg.views, mode) for r in rows]
    out.boxes = [r["box"] for r in rows]
    out.view_ts = inputs.ts.astype(float).round(6).tolist()
    out.view_boxes = [np.asarray(r["view_boxes"])[idx].astype(int).tolist() for r, idx in zip(rows, chosen)]
    out.views, out.view_index, out.rois = inputs.views, inputs.view_index, inputs.rois
    return out


# -------------------------------------------------------------------------------------------------- the model


def predict_items(model: Any, items: Sequence[Prepared], max_regions: int) -> list[list[Any]]:
    """RegionPredictions per item from one forward over all their regions (chunked by ``max_regions``).

    Texts of all items are scored together (each text query is scored on its own, so this equals per-item
    scoring) and each item gets back only its own texts.
    """
    import torch

    from dynrefer.batching import concat_views, take_regions

    live = [it for it in items if it.failure is None and it.boxes]
    if not live:
        return [[] for _ in items]
    texts = list(dict.fromkeys(t for it in live for t in it.texts))
    views, view_index = concat_views([(it.views, it.view_index) for it in live])
    rois = np.concatenate([it.rois for it in live])
    device = next(model.parameters()).device
    preds = []
    for start in range(0, len(rois), max_regions):
        chunk = slice(start, start + max_regions)
        chunk_views, chunk_index = take_regions(views, view_index, chunk)  # the views these regions use
        preds += model.predict(torch.from_numpy(chunk_views).to(device), torch.from_numpy(chunk_index).to(device),
                               torch.from_numpy(rois[chunk]).to(device), texts=texts or None)
    out, k = [], 0
    for it in items:
        n = len(it.boxes) if it.failure is None else 0
        out.append([dataclasses.replace(p, text_scores={t: p.text_scores[t] for t in it.texts})
                    for p in preds[k: k + n]])
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


# ------------------------------------------------------------------------------------------------- responses


class TagScore(BaseModel):
    tag: str
    score: float


class LabelScore(BaseModel):
    name: str
    score: float


class ViewOut(BaseModel):
    t: float
    box: list[int]


class RegionOut(BaseModel):
    index: int
    box: list[float]
    score: float | None = None
    caption: str
    caption_score: float | None = None  # the caption's probability under the LM; null until the model gives one
    tags: list[TagScore]
    text_scores: dict[str, float]
    category: LabelScore | None = None  # null when the model has no recognition categories
    attributes: list[LabelScore] | None = None  # those over the model's threshold; null without attributes
    views: list[ViewOut]


class ImageOut(BaseModel):
    width: int
    height: int


class BatchOut(BaseModel):
    requests: int
    regions: int
    replica: str


class RegionsResponse(BaseModel):
    request_id: str
    image: ImageOut
    source: str
    regions: list[RegionOut]
    batch: BatchOut


class ErrorBody(BaseModel):
    error: str
    message: str
    request_id: str
    reason: str | None = None
    details: list[dict[str, Any]] | None = None


class RegionsRequest(BaseModel):
    """The JSON form; multipart/form-data takes the same fields (``image`` a file, the others JSON text)."""

    image: str
    boxes: list[list[float]] | None = None
    texts: list[str] | None = None


def recognition_results(rec: Any) -> dict[str, Any]:
    """``category`` and ``attributes`` of a region's Recognition; null where the model names no such labels."""
    has_categories = rec is not None and rec.category is not None
    has_attributes = rec is not None and bool(rec.attribute_scores)
    return {"category": {"name": rec.category, "score": round(rec.category_score, 6)} if has_categories else None,
            "attributes": [{"name": a, "score": round(s, 6)} for a, s in rec.attributes] if has_attributes else None}


def region_results(prepared: Prepared, preds: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"index": i, "box": [round(v, 2) for v in box], "score": score, "caption": p.caption,
             "caption_score": None if getattr(p, "caption_score", None) is None else round(float(p.caption_score), 6),
             "tags": [{"tag": t, "score": round(s, 4)} for t, s in p.tags],
             "text_scores": {t: round(s, 6) for t, s in p.text_scores.items()},
             **recognition_results(p.recognition),
             "views": [{"t": t, "box": b} for t, b in zip(ts, vb)]}
            for i, (box, score, p, ts, vb) in enumerate(zip(prepared.boxes, prepared.scores, preds,
                                                             prepared.view_ts, prepared.view_boxes))]


@dataclass
class Answer:
    """What the Predictor returns for one request."""

    prepared: Prepared  # without pixels
    regions: list[dict[str, Any]]  # region_results: plain data, so the ingress never imports torch
    batch_requests: int = 0
    batch_regions: int = 0
    replica: str = ""


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """A JSON error for any exception: a RequestError says what is wrong; anything else is a bare 500."""
    if isinstance(exc, RequestError):
        return JSONResponse(exc.body(request_id), status_code=exc.status)
    log.error("request %s failed", request_id, exc_info=exc)
    return JSONResponse({"error": "internal", "message": "internal server error; quote the request id when "
                                                          "reporting it", "request_id": request_id}, status_code=500)


async def guarded(work: Callable[[str], Awaitable[Any]], request_id: str | None = None) -> Response:
    """Run a route's work; every failure becomes JSON, never a stack trace.

    ``request_id`` is the X-Request-ID header, which Serve's proxy sets (the client's, or one it draws) and sends
    back on the response, so the id in a body, the response header and Serve's logs are one.
    """
    request_id = request_id or uuid.uuid4().hex
    try:
        result = await work(request_id)
    except Exception as e:  # noqa: BLE001 - every failure must become a JSON answer
        return error_response(e, request_id)
    return result if isinstance(result, Response) else JSONResponse(result)


#: Request ids taken from clients: a short token of these characters (a UUID, a trace id); others get a fresh one.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id(request: Request) -> str | None:
    """The client's X-Request-ID when it is a sane id, else None (a fresh one is drawn): the id is echoed in the
    body and written to the logs, so 8 KB of markup must not be. Serve's proxy still copies the raw header onto
    the response; that header is the proxy's, not the app's."""
    value = request.headers.get("x-request-id")
    return value if value is not None and REQUEST_ID.fullmatch(value) else None


async def bounded(response: Any, timeout_s: float, what: str, upstream: Sequence[Any] = ()) -> Any:
    """Await a DeploymentResponse for at most ``timeout_s``; past that, cancel it and the ``upstream`` responses
    it was fed, and answer 504."""
    async def wait():
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        for r in (response, *upstream):
            r.cancel()
        raise RequestError(504, "timeout", f"{what} took longer than {timeout_s:g} s") from None


# ------------------------------------------------------------------------------------------------- web page
# Defined before the ingress: serve.ingress freezes (pickles) the FastAPI app and its routes' globals when the
# class is decorated.

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DynRefer regions</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#161616;color:#eee}
header{padding:12px 18px;background:#222;border-bottom:1px solid #333}
h1{font-size:18px;margin:0 0 8px}
.controls{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
input[type=text]{width:280px;padding:5px;background:#111;color:#eee;border:1px solid #444}
button{padding:6px 12px;background:#3a6ea5;color:#fff;border:0;border-radius:3px;cursor:pointer}
button.secondary{background:#555}
#status{margin:8px 18px;min-height:1.4em}
#status[data-state=error]{color:#ff8a80}
main{display:flex;gap:18px;padding:0 18px 18px;align-items:flex-start;flex-wrap:wrap}
canvas{background:#000;cursor:crosshair;max-width:100%;border:1px solid #333}
#results{margin:0;padding-left:26px;max-width:460px}
#results li{margin-bottom:10px;border-left:4px solid;padding-left:8px}
.caption{font-weight:600}
.recognition{color:#ffd27f}
.meta{display:block;color:#aaa;font-size:13px}
</style></head>
<body>
<header><h1>DynRefer: region captions</h1>
<div class="controls">
<input type="file" id="file" accept="image/*">
<input type="text" id="texts" placeholder="texts to score, comma separated (optional)">
<button id="caption">Caption boxes</button>
<button id="dense">Dense captions</button>
<button id="clear" class="secondary">Clear boxes</button>
</div></header>
<p id="status" data-state="idle">Choose an image, then drag boxes on it with the mouse.</p>
<main><canvas id="canvas" width="640" height="400"></canvas><ol id="results"></ol></main>
<script>
(function () {
  "use strict";
  var $ = function (s) { return document.querySelector(s); };
  var canvas = $("#canvas"), ctx = canvas.getContext("2d");
  var base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
  var state = {file: null, img: null, scale: 1, boxes: [], results: [], drag: null, imageLoaded: false,
               lastRequestBoxes: null, lastResponse: null};
  window.dynrefer = state;
  function colour(i) { return "hsl(" + Math.round((i * 137.5) % 360) + ",85%,58%)"; }
  function setStatus(text, st) { var s = $("#status"); s.textContent = text; s.dataset.state = st; }
  function point(ev) {
    var r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * canvas.width / r.width / state.scale,
            (ev.clientY - r.top) * canvas.height / r.height / state.scale];
  }
  function box(a, b) {
    var w = state.img.naturalWidth, h = state.img.naturalHeight;
    var c = function (v, m) { return Math.max(0, Math.min(m, Math.round(v))); };
    return [c(Math.min(a[0], b[0]), w), c(Math.min(a[1], b[1]), h),
            c(Math.max(a[0], b[0]), w), c(Math.max(a[1], b[1]), h)];
  }
  function label(b, i, text) {
    var s = state.scale, x = b[0] * s, y = b[1] * s;
    ctx.strokeStyle = colour(i); ctx.lineWidth = 3; ctx.setLineDash([]);
    ctx.strokeRect(x, y, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
    ctx.font = "bold 14px sans-serif";
    var t = text ? (i + 1) + ". " + text : String(i + 1), w = ctx.measureText(t).width + 8;
    ctx.fillStyle = colour(i); ctx.fillRect(x, Math.max(0, y - 20), Math.min(w, canvas.width - x), 20);
    ctx.fillStyle = "#000"; ctx.fillText(t, x + 4, Math.max(0, y - 20) + 15, canvas.width - x - 8);
  }
  function draw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!state.img) return;
    ctx.drawImage(state.img, 0, 0, canvas.width, canvas.height);
    if (state.results.length) state.results.forEach(function (r, i) { label(r.box, i, r.caption || "(no caption)"); });
    else state.boxes.forEach(function (b, i) { label(b, i, ""); });
    if (state.drag) {
      var b = box(state.drag[0], state.drag[1]), s = state.scale;
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.setLineDash([6, 4]);
      ctx.strokeRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
    }
  }
  function showResults(body) {
    var list = $("#results"); list.textContent = "";
    body.regions.forEach(function (r, i) {
      var li = document.createElement("li"); li.style.borderColor = colour(i);
      var cap = document.createElement("span"); cap.className = "caption";
      cap.textContent = r.caption || "(no caption)"; li.appendChild(cap);
      var rec = [];
      if (r.category) rec.push(r.category.name + " " + r.category.score.toFixed(2));
      if (r.attributes) {
        rec.push("attributes: " + (r.attributes.length ? r.attributes.map(function (a) {
          return a.name + " " + a.score.toFixed(2); }).join(", ") : "none"));
      }
      if (rec.length) {
        var recog = document.createElement("span"); recog.className = "recognition";
        recog.textContent = " [" + rec.join("; ") + "]"; li.appendChild(recog);
      }
      var meta = document.createElement("span"); meta.className = "meta";
      var parts = ["box " + r.box.map(Math.round).join(", "),
                   "views t = " + r.views.map(function (v) { return v.t; }).join(", ")];
      if (r.score !== null && r.score !== undefined) parts.push("proposal " + r.score.toFixed(2));
      if (r.tags.length) {
        parts.push("tags " + r.tags.map(function (t) { return t.tag + " " + t.score.toFixed(2); }).join(", "));
      }
      var ts = Object.keys(r.text_scores);
      if (ts.length) {
        parts.push("texts " + ts.map(function (t) { return t + " " + r.text_scores[t].toFixed(3); }).join(", "));
      }
      meta.textContent = parts.join(" | "); li.appendChild(meta); list.appendChild(li);
    });
  }
  $("#file").addEventListener("change", function () {
    var f = this.files[0]; if (!f) return;
    state.file = f; state.boxes = []; state.results = []; state.imageLoaded = false; $("#results").textContent = "";
    var img = new Image();
    img.onload = function () {
      state.img = img;
      state.scale = Math.min(3, 760 / img.naturalWidth, 640 / img.naturalHeight);
      canvas.width = Math.round(img.naturalWidth * state.scale);
      canvas.height = Math.round(img.naturalHeight * state.scale);
      state.imageLoaded = true; draw();
      setStatus(img.naturalWidth + " x " + img.naturalHeight +
                " image: drag boxes, then Caption boxes; or Dense captions.", "ready");
    };
    img.onerror = function () { setStatus("this browser cannot show the file; it may not be an image", "error"); };
    img.src = URL.createObjectURL(f);
  });
  canvas.addEventListener("mousedown", function (ev) { if (state.img) { var p = point(ev); state.drag = [p, p]; } });
  canvas.addEventListener("mousemove", function (ev) { if (state.drag) { state.drag[1] = point(ev); draw(); } });
  window.addEventListener("mouseup", function (ev) {
    if (!state.drag) return;
    state.drag[1] = point(ev);
    var b = box(state.drag[0], state.drag[1]); state.drag = null;
    if (b[2] - b[0] >= 2 && b[3] - b[1] >= 2) {
      state.boxes.push(b); state.results = []; $("#results").textContent = "";
    }
    draw();
  });
  $("#clear").addEventListener("click", function () {
    state.boxes = []; state.results = []; $("#results").textContent = ""; draw();
  });
  function send(endpoint, boxes) {
    if (!state.file) { setStatus("choose an image first", "error"); return; }
    var form = new FormData(); form.append("image", state.file, state.file.name);
    if (boxes) form.append("boxes", JSON.stringify(boxes));
    var texts = $("#texts").value.split(",").map(function (t) { return t.trim(); }).filter(Boolean);
    if (texts.length) form.append("texts", JSON.stringify(texts));
    state.lastRequestBoxes = boxes; setStatus("working...", "busy");
    fetch(base + endpoint, {method: "POST", body: form}).then(function (r) {
      return r.json().then(function (body) { return [r, body]; }, function () { return [r, null]; });
    }).then(function (rb) {
      var r = rb[0], body = rb[1];
      if (!r.ok || !body) { setStatus(r.status + ": " + (body ? body.message : r.statusText), "error"); return; }
      state.lastResponse = body; state.results = body.regions; showResults(body); draw();
      setStatus(body.regions.length + " region(s) captioned (request " + body.request_id + ")", "done");
    }).catch(function (e) { setStatus("request failed: " + e, "error"); });
  }
  $("#caption").addEventListener("click", function () {
    if (!state.boxes.length) {
      setStatus("drag at least one box on the image (or use Dense captions)", "error"); return;
    }
    send("v1/regions", state.boxes.slice());
  });
  $("#dense").addEventListener("click", function () {
    send("v1/dense", state.boxes.length ? state.boxes.slice() : null);
  });
})();
</script></body></html>
"""


# ----------------------------------------------------------------------------------------------- deployments


@serve.deployment(name="Preprocess")
class Preprocess:
    """CPU replica: image bytes -> views, RoIs and pHASH-chosen t per region (and proposals for dense)."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = parse_config(config)
        self.model_cfg = model_config(self.cfg)
        self.mode = self.cfg.views or self.model_cfg.views.selection
        self.proposer = None
        if self.cfg.proposals:
            import torch

            from dynrefer.proposals import load_proposer

            gpu = self.cfg.preprocess.num_gpus > 0 and torch.cuda.is_available()
            self.proposer = load_proposer(self.cfg.proposals, self.cfg.storage_options or None,
                                          device="cuda" if gpu else "cpu")

    def prepare(self, data: bytes, boxes: list[list[float]] | None, texts: list[str]) -> Prepared:
        return prepare_request(data, boxes, texts, self.model_cfg, self.mode, self.cfg.limits, self.proposer,
                               self.cfg.dense)

    def ready(self) -> bool:
        return True


@serve.deployment(name="Predictor")
class Predictor:
    """The model; with batching on, concurrent requests share one forward (``@serve.batch``)."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from dynrefer.checkpoint import load_pretrained

        self.cfg = parse_config(config)
        use_gpu = self.cfg.predictor.num_gpus > 0 and torch.cuda.is_available()
        self.model = load_pretrained(self.cfg.model, self.cfg.storage_options or None,
                                     device="cuda" if use_gpu else "cpu")
        self.stats = BatchStats()
        self.lock = asyncio.Lock()  # unbatched: one forward at a time, as on one accelerator
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.predict_batched.set_max_batch_size(self.cfg.batching.max_batch_size)
        self.predict_batched.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)

    async def predict(self, prepared: Prepared) -> Answer:
        if prepared.failure is not None:
            return Answer(prepared, [])
        if self.cfg.batching.enabled:
            return await self.predict_batched(prepared)
        async with self.lock:
            return (await self._run([prepared]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def predict_batched(self, items: list[Prepared]) -> list[Answer]:
        return await self._run(items)

    async def _run(self, items: list[Prepared]) -> list[Answer]:
        preds = await asyncio.to_thread(predict_items, self.model, items, self.cfg.batching.max_regions_per_forward)
        regions = sum(len(p) for p in preds)
        self.stats.record(len(items), regions)
        return [Answer(it.without_pixels(), region_results(it, p), len(items), regions, self.replica)
                for it, p in zip(items, preds)]

    def info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {"path": self.cfg.model, "device": str(next(self.model.parameters()).device),
                "config": config_summary(cfg), "parameters": parameter_summary(self.model),
                "views": {"num_views": cfg.views.num_views, "candidate_ts": list(cfg.views.candidate_ts),
                          "selection": self.cfg.views or cfg.views.selection, "fixed_ts": list(cfg.views.fixed_ts),
                          "view_size": cfg.image_size},
                "batching": {**dataclasses.asdict(self.cfg.batching), "replica": self.replica,
                             **self.stats.summary()}}

    def ready(self) -> bool:
        return True


app = FastAPI(title="DynRefer", version="0.1.0",
              description="Region captions, tags and region-text scores (DynRefer, arXiv 2405.16071).")

ERRORS = {s: {"model": ErrorBody} for s in (400, 413, 415, 422, 500, 504)}

#: Error codes for the HTTP errors FastAPI raises itself (no route, wrong method, ...).
HTTP_ERRORS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
               413: "body_too_large", 415: "unsupported_media_type", 422: "bad_request"}


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404/405/...: the same JSON body as every other error (not ``{"detail": ...}``)."""
    rid = request_id(request) or uuid.uuid4().hex
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {clip_text(request.url.path)}; see /docs"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {clip_text(request.url.path)}; see /docs"
    return JSONResponse({"error": HTTP_ERRORS.get(exc.status_code, "http_error"), "message": message,
                         "request_id": rid}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "bad_request", "message": "request does not match the API; see /docs",
                         "request_id": request_id(request) or uuid.uuid4().hex}, status_code=422)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc, request_id(request) or uuid.uuid4().hex)


app.add_exception_handler(StarletteHTTPException, http_error)
app.add_exception_handler(RequestValidationError, validation_error)
app.add_exception_handler(Exception, internal_error)
REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RegionsRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"},
        "boxes": {"type": "string", "description": "JSON list of [x1, y1, x2, y2] in pixels"},
        "texts": {"type": "string", "description": "JSON list of texts to score against each region"}}}},
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}}}}


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP in, JSON out; the work happens in Preprocess and Predictor, reached through their handles."""

    def __init__(self, preprocess: Any, predictor: Any, config: dict[str, Any]):
        self.cfg = parse_config(config)
        self.preprocess, self.predictor = preprocess, predictor

    async def _regions(self, request: Request, request_id: str, dense: bool) -> dict[str, Any]:
        started = time.perf_counter()
        limits = self.cfg.limits
        check_content_type(request.headers.get("content-type"))
        body = await read_body(request, limits.max_body_bytes)
        payload = parse_payload(request.headers.get("content-type"), body, limits)
        if payload.boxes is None:
            if not dense:
                raise RequestError(422, "bad_box", "boxes: missing; give [[x1, y1, x2, y2], ...] in pixels")
            if not self.cfg.proposals:
                raise RequestError(501, "no_proposals", "this server has no proposal model (set 'proposals:' in its "
                                                        "serve config); send 'boxes' from any detector instead")
        elif not dense and not payload.boxes:
            raise RequestError(422, "bad_box", "boxes: give at least one box")
        prepared = self.preprocess.prepare.remote(payload.image, payload.boxes, payload.texts)
        answer: Answer = await bounded(self.predictor.predict.remote(prepared), limits.request_timeout_s,
                                       "captioning", upstream=[prepared])
        p = answer.prepared
        if p.failure is not None:
            f = dict(p.failure)
            raise RequestError(f.pop("status"), f.pop("error"), f.pop("message"), **f)
        log.info("request %s: %d regions in %.0f ms (forward shared by %d requests)", request_id, len(p.boxes),
                 1000 * (time.perf_counter() - started), answer.batch_requests)
        return {"request_id": request_id, "image": {"width": p.width, "height": p.height}, "source": p.source,
                "regions": answer.regions,
                "batch": {"requests": answer.batch_requests, "regions": answer.batch_regions,
                          "replica": answer.replica}}

    @app.post("/v1/regions", response_model=RegionsResponse, responses=ERRORS, openapi_extra=REQUEST_BODY,
              summary="Caption given boxes", description="Per box: caption, tags with scores, scores of the given "
              "texts, and the views used (t and crop box). The image comes as multipart, base64 JSON or raw bytes.")
    async def regions(self, request: Request) -> Response:
        return await guarded(lambda rid: self._regions(request, rid, dense=False), request_id(request))

    @app.post("/v1/dense", response_model=RegionsResponse, responses={**ERRORS, 501: {"model": ErrorBody}},
              openapi_extra=REQUEST_BODY, summary="Dense captioning",
              description="Regions from the configured proposal model (501 without one), or from 'boxes' given by "
              "any detector, each with its caption.")
    async def dense(self, request: Request) -> Response:
        return await guarded(lambda rid: self._regions(request, rid, dense=True), request_id(request))

    @app.get("/healthz", summary="Liveness: the model and preprocessing deployments answer")
    async def healthz(self, request: Request) -> Response:
        async def check(request_id: str) -> Response:
            try:
                await asyncio.gather(bounded(self.predictor.ready.remote(), 10.0, "model health check"),
                                     bounded(self.preprocess.ready.remote(), 10.0, "preprocess health check"))
                return JSONResponse({"status": "ok"})
            except Exception as e:  # noqa: BLE001 - any failure to answer means unhealthy
                log.warning("health check %s failed: %s", request_id, e)
                return JSONResponse({"status": "unavailable", "request_id": request_id}, status_code=503)

        return await guarded(check, request_id(request))

    @app.get("/v1/model", summary="Model config, parameter counts, view settings, batching counters")
    async def model(self, request: Request) -> Response:
        async def info(request_id: str) -> dict[str, Any]:
            out = await bounded(self.predictor.info.remote(), self.cfg.limits.request_timeout_s, "model info")
            return {**out, "limits": dataclasses.asdict(self.cfg.limits), "proposals": self.cfg.proposals,
                    "dense": dataclasses.asdict(self.cfg.dense)}

        return await guarded(info, request_id(request))

    @app.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for ``serve run pipelines.serve:app_builder`` and Serve config files (``args`` = ServeConfig)."""
    cfg = parse_config(args)
    raw = dataclasses.asdict(cfg)
    preprocess = Preprocess.options(**deployment_options(cfg.preprocess)).bind(raw)
    predictor = Predictor.options(**deployment_options(cfg.predictor)).bind(raw)
    return Ingress.options(**deployment_options(cfg.ingress)).bind(preprocess, predictor, raw)


def replica_processes(app_name: str, deployment: str) -> dict[str, int]:
    """Process id of every live replica of a deployment, by replica id (as in a response's ``batch.replica``).

    Read from the GCS actor table: Ray's state API (``ray.util.state``) needs the dashboard, which clusters started
    with ``include_dashboard=False`` do not run. Needs ``ray.init`` on the app's cluster.
    """
    from ray._private.state import actors
    from ray.serve._private.common import DeploymentID, ReplicaID

    prefix = ReplicaID("", DeploymentID(deployment, app_name)).to_full_id_str()
    return {a["Name"][len(prefix):]: a["Pid"] for a in actors().values()
            if a["State"] == "ALIVE" and a["Name"].startswith(prefix)}


# ------------------------------------------------------------------------------------------------------- CLI


def read_serve_file(path: str) -> dict[str, Any]:
    """A Serve config file (the format of ``serve deploy``) whose applications are all this module's app."""
    import yaml

    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    apps = spec.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    for a in apps:
        if a.get("import_path") != "pipelines.serve:app_builder":
            raise ValueError(f"{path}: application {a.get('name')!r} imports {a.get('import_path')!r}; "
                             f"dynrefer serve runs pipelines.serve:app_builder only")
        parse_config(a.get("args") or {})
    return spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a Serve config file, e.g. configs/serve/local.yaml")
    p.add_argument("--model", help="exported model directory, overriding every application's args.model")
    p.add_argument("--host", help="bind address (default: the file's http_options.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the file's http_options.port, else 8000)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = read_serve_file(args.config)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    http = {"host": "127.0.0.1", "port": 8000, **(spec.get("http_options") or {})}
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options=http, proxy_location=spec.get("proxy_location", "HeadOnly"))
        for a in spec["applications"]:
            app_args = {**(a.get("args") or {}), **({"model": args.model} if args.model else {})}
            serve.run(app_builder(app_args), name=a.get("name", "dynrefer"), route_prefix=a.get("route_prefix", "/"))
            log.info("application %s at http://%s:%s%s", a.get("name", "dynrefer"), http["host"], http["port"],
                     a.get("route_prefix", "/"))
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
