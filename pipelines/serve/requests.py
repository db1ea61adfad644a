"""Reading requests: content types, the body under its size limit, JSON / multipart / raw-image payloads, and the
checks on boxes and texts; every refusal is a :class:`RequestError` with a short message."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser, HeaderParser
from typing import Any

from fastapi import Request

from .config import Limits
from .errors import RequestError, clip_text


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

