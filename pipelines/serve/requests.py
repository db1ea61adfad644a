"""Reading requests: content types, the body under its size limit, JSON / multipart / raw-image payloads, and the
checks on region prompts (boxes or masks) and texts; every refusal is a :class:`RequestError` with a short message.

Multipart bodies go through Starlette's own form parser (``python-multipart``), fed from a stream that refuses
the body as soon as it passes the size limit; JSON goes through :func:`json.loads`, whose refusals (an integer of
thousands of digits, nesting past the recursion limit) become 400s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
from dataclasses import dataclass, field
from email.parser import HeaderParser
from typing import Any, AsyncIterator, Awaitable, Mapping, TypeVar

from fastapi import Request
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .config import Limits
from .errors import RequestError, clip_text

T = TypeVar("T")


@dataclass
class Payload:
    """What one request asks: the image's bytes, its region prompts (boxes or masks, at most one kind) and texts."""

    image: bytes
    boxes: list[list[float]] | None  # None: not given
    texts: list[str] = field(default_factory=list)
    masks: list[Any] | None = None  # PNG bytes, base64 strings or COCO RLE dicts (decoded by Preprocess)


JSON_TYPES = ("application/json",)
MULTIPART_TYPES = ("multipart/form-data",)
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp", "image/tiff", "image/bmp")
FIELDS = ("image", "boxes", "masks", "texts")
POINTS_REFUSED = ("points are not accepted: this server has no segmenter to turn a point into a region; send a box "
                  "([x1, y1, x2, y2] in pixels) or a mask of the region")


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


def check_content_type(header: str | None, accepted: tuple[str, ...] = JSON_TYPES + MULTIPART_TYPES + IMAGE_TYPES
                       ) -> str:
    """The media type, or a 415 that lists what is accepted."""
    media, _ = content_type(header)
    if media in accepted:
        return media
    if accepted == JSON_TYPES:
        raise RequestError(415, "unsupported_media_type",
                           f"Content-Type {clip_text(header or '(none)')!r} is not accepted; send application/json")
    raise RequestError(415, "unsupported_media_type",
                       f"Content-Type {clip_text(header or '(none)')!r} is not accepted; send application/json "
                       f"(base64 'image'), multipart/form-data (an 'image' file part) or the image bytes as one of "
                       f"{', '.join(IMAGE_TYPES)}")


def check_length(declared: str | None, limit: int) -> None:
    """A 413 when the Content-Length header already passes ``limit`` (before any byte is read), 400 if it is no
    byte count."""
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise RequestError(400, "bad_request", f"Content-Length {clip_text(declared)!r} is not a byte count")
    if int(declared) > limit:
        raise RequestError(413, "body_too_large", f"request body is {int(declared)} bytes; the limit is {limit}")


async def limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused with 413 as soon as their total passes ``limit``."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit``: by Content-Length, else while reading."""
    check_length(request.headers.get("content-length"), limit)
    return b"".join([chunk async for chunk in limited(request.stream(), limit)])


def json_document(name: str, text: str | bytes) -> Any:
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


def decode_base64(value: Any, name: str = "image") -> bytes:
    """Bytes of a base64 string, with or without a ``data:...;base64,`` prefix."""
    if not isinstance(value, str) or not value:
        raise RequestError(422, "bad_image", f"{name}: expected a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "bad_image", f"{name}: not valid base64") from None


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


def check_masks(masks: Any, limits: Limits) -> list[Any] | None:
    """Masks as PNG bytes, base64 strings or COCO RLE dicts; their pixels are decoded (and checked against the
    image) by Preprocess, only their form and number here."""
    if masks is None:
        return None
    if not isinstance(masks, list):
        raise RequestError(422, "bad_mask", "masks: expected a list of masks (base64 PNGs or COCO RLE objects)")
    if len(masks) > limits.max_boxes:
        raise RequestError(422, "too_many_boxes", f"{len(masks)} masks; the limit is {limits.max_boxes} per request")
    for i, m in enumerate(masks):
        if isinstance(m, (bytes, str)) and m:
            continue
        if isinstance(m, Mapping) and set(m) == {"size", "counts"}:
            continue
        raise RequestError(422, "bad_mask", f"masks[{i}] {clip_text(m)}: expected a PNG (a file part or base64) or "
                                            f"a COCO RLE object {{'size': [h, w], 'counts': ...}}")
    return masks


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


def region_prompts(fields: Mapping[str, Any], limits: Limits) -> tuple[list[list[float]] | None, list[Any] | None]:
    """(boxes, masks) of a request: at most one kind; points are refused (422 with what to send instead)."""
    if "points" in fields or "point" in fields:
        raise RequestError(422, "points_not_supported", POINTS_REFUSED)
    boxes, masks = check_boxes(fields.get("boxes"), limits), check_masks(fields.get("masks"), limits)
    if boxes is not None and masks is not None:
        raise RequestError(422, "bad_request", "give the regions as 'boxes' or as 'masks', not both")
    return boxes, masks


class FormParser(MultiPartParser):
    """Starlette's multipart parser, noting whether the closing boundary came (python-multipart takes a body
    that just stops as complete)."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


async def parse_form(header: str, chunks: AsyncIterator[bytes], limits: Limits) -> Payload:
    """The fields of a multipart/form-data body: ``image`` a file part, ``masks`` file parts (PNGs) or JSON text,
    ``boxes`` and ``texts`` JSON text."""
    multipart_boundary(content_type(header)[1])
    parser = FormParser(Headers({"content-type": header}), chunks, max_files=limits.max_boxes + 1,
                        max_fields=len(FIELDS) + 1, max_part_size=limits.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise RequestError(400, "bad_request", f"multipart body refused: {e.message}") from None
    try:
        if not parser.complete:
            raise RequestError(400, "bad_request", "multipart body is malformed (no closing boundary)")
        names = list(dict.fromkeys(form.keys()))
        if "points" in names:
            raise RequestError(422, "points_not_supported", POINTS_REFUSED)
        unknown = [n for n in names if n not in FIELDS]
        if unknown:
            raise RequestError(422, "bad_request", f"unknown form field {clip_text(unknown[0])!r}; known: "
                                                   f"{', '.join(FIELDS)}")
        for name in ("image", "boxes", "texts"):
            if len(form.getlist(name)) > 1:
                raise RequestError(422, "bad_request", f"form field {name!r} given twice")
        image = form.get("image")
        if image is None:
            raise RequestError(422, "bad_image", "image: missing (a file part named 'image')")
        if not isinstance(image, UploadFile):
            raise RequestError(422, "bad_image", "image: send it as a file part (a Content-Disposition with a "
                                                 "filename), not as a text field")
        fields: dict[str, Any] = {}
        for name in ("boxes", "texts"):
            value = form.get(name)
            if isinstance(value, UploadFile):
                value = (await value.read()).decode(errors="replace")
            if value is not None:
                fields[name] = json_document(name, value)
        if "masks" in form:
            masks: list[Any] = []
            for part in form.getlist("masks"):
                if isinstance(part, UploadFile):
                    masks.append(await part.read())
                else:
                    doc = json_document("masks", part)
                    masks.extend(doc if isinstance(doc, list) else [doc])
            fields["masks"] = masks
        boxes, masks = region_prompts(fields, limits)
        return Payload(await image.read(), boxes, check_texts(fields.get("texts"), limits), masks)
    finally:
        await form.close()


def parse_document(doc: Any, limits: Limits) -> Payload:
    """The JSON form: ``image`` base64 (or a ``data:`` URL), ``boxes`` or ``masks``, ``texts``."""
    if not isinstance(doc, dict):
        raise RequestError(400, "bad_request", "body: expected a JSON object")
    if "image" not in doc and any(k in doc for k in ("url", "image_url")):
        raise RequestError(422, "url_not_fetched", "this server never fetches URLs; send the image itself "
                                                   "(base64 'image', or a multipart upload)")
    if "points" in doc:
        raise RequestError(422, "points_not_supported", POINTS_REFUSED)
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise RequestError(422, "bad_request", f"unknown field(s) {clip_text(unknown)}; known: {', '.join(FIELDS)}")
    if "image" not in doc:
        raise RequestError(422, "bad_image", "image: missing (a base64 string)")
    image = decode_base64(doc["image"])
    boxes, masks = region_prompts(doc, limits)
    return Payload(image, boxes, check_texts(doc.get("texts"), limits), masks)


async def parse_payload(header: str | None, body: bytes | AsyncIterator[bytes], limits: Limits) -> Payload:
    """The image bytes, region prompts and texts of a JSON, multipart or raw-image request body (bytes, or the
    body's chunks as :func:`limited` yields them)."""
    media, _ = content_type(header)
    if isinstance(body, (bytes, bytearray)):
        chunks = _one(bytes(body))
    else:
        chunks = body
    if media in MULTIPART_TYPES:
        return await parse_form(header or "", chunks, limits)
    data = b"".join([c async for c in chunks])
    if media in IMAGE_TYPES:
        return Payload(image=data, boxes=None)
    if media in JSON_TYPES:
        return parse_document(json_document("body", data.decode("utf-8", errors="replace")), limits)
    raise RequestError(415, "unsupported_media_type", f"Content-Type {clip_text(header)!r} is not accepted")


async def read_payload(request: Request, limits: Limits) -> Payload:
    """A request's payload, its body refused past ``limits.max_body_bytes`` before (or while) it is read."""
    header = request.headers.get("content-type")
    check_content_type(header)
    check_length(request.headers.get("content-length"), limits.max_body_bytes)
    return await parse_payload(header, limited(request.stream(), limits.max_body_bytes), limits)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def within(reading: Awaitable[T], limits: Limits, deadline: float) -> T:
    """A body read that must end within ``limits.body_timeout_s`` and before the request's ``deadline`` (a
    ``time.monotonic()``): a client that trickles its upload frees its ingress slot with a 408, not after the
    proxy's own timeout."""
    timeout = min(limits.body_timeout_s, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(reading, max(timeout, 0.0))
    except asyncio.TimeoutError:
        raise RequestError(408, "body_timeout", f"the request body did not arrive within {timeout:.3g} s; send it "
                                                f"faster or smaller") from None
