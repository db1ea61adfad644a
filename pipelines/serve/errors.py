"""How the app refuses and fails: one JSON error body (``error``, ``message``, ``request_id``) for every route,
FastAPI's own 404/405/422 included, request ids that are safe to echo, and bounded waits on the deployments.

Work the app could not do through no fault of the request is a 503 with ``Retry-After``, so clients back off and
retry: a deployment's queue is full (Serve's ``BackPressureError``), or the replica holding the request died
(``RayActorError``: its actor died or is unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from typing import Any, Awaitable, Callable, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dynrefer.serve")


class RequestError(Exception):
    """A request we refuse: HTTP status, a short code, and a message that says what is wrong."""

    def __init__(self, status: int, error: str, message: str, retry_after_s: float | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.error, self.message, self.extra = status, error, message, extra
        self.retry_after_s = retry_after_s

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, **self.extra, "request_id": request_id}

    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else retry_after(self.retry_after_s)


def retry_after(seconds: float) -> dict[str, str]:
    """A ``Retry-After`` header: whole seconds (RFC 9110), rounded up so that no client retries too early."""
    return {"Retry-After": str(max(0, math.ceil(seconds)))}


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


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """A JSON error for any exception: a RequestError says what is wrong; anything else is a bare 500."""
    if isinstance(exc, RequestError):
        return JSONResponse(exc.body(request_id), status_code=exc.status, headers=exc.headers())
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


def unavailable(exc: BaseException, what: str, retry_after_s: float) -> RequestError | None:
    """The 503 for a failure of Serve rather than of the request (a full queue, a dead replica); None otherwise."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return RequestError(503, "overloaded", f"{what}: every replica is busy and the queue is full; retry later",
                            retry_after_s)
    if isinstance(exc, RayActorError):
        return RequestError(503, "replica_lost", f"{what}: the replica working on this request stopped; retry (a "
                                                 f"replacement is starting)", retry_after_s)
    if isinstance(exc, DeploymentUnavailableError):
        return RequestError(503, "unavailable", f"{what}: the deployment is not running", retry_after_s)
    return None


def submit(call: Callable[[], Any], what: str, retry_after_s: float = 1.0) -> Any:
    """``call()`` (a handle's ``.remote``), a full queue refusing it at once being the 503 of :func:`unavailable`."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - sorted into Serve's failures (503) and the rest (500)
        lost = unavailable(e, what, retry_after_s)
        if lost is None:
            raise
        raise lost from None


async def bounded(response: Any, timeout_s: float, what: str, upstream: Sequence[Any] = (),
                  retry_after_s: float = 1.0) -> Any:
    """Await a DeploymentResponse for at most ``timeout_s``; past that, cancel it and the ``upstream`` responses
    it was fed, and answer 504. A full queue or a lost replica is a 503 with ``Retry-After``."""
    async def wait():
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        cancel(response, *upstream)
        raise RequestError(504, "timeout", f"{what} took longer than {timeout_s:g} s") from None
    except Exception as e:  # noqa: BLE001 - sorted into Serve's failures (503) and the rest (500)
        lost = unavailable(e, what, retry_after_s)
        if lost is None:
            raise
        cancel(*upstream)
        raise lost from None


def cancel(*responses: Any) -> None:
    """Cancel DeploymentResponses; one that already failed (its queue was full) raises that failure on
    ``cancel``, and there is nothing left to cancel."""
    for r in responses:
        try:
            r.cancel()
        except Exception:  # noqa: BLE001 - the response's own failure, reported through the one awaited
            pass


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
