"""The HTTP side: the FastAPI app behind ``Ingress`` (routes, OpenAPI, the page) and ``app_builder``, which binds
Ingress to the Preprocess and Predictor deployments.

No ``from __future__ import annotations`` here: FastAPI, behind ``serve.ingress``, must see the route annotations
as types (as strings, ``request: Request`` would become a query parameter).
"""

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import deployment_options, parse_config
from .deployments import Predictor, Preprocess
from .errors import RequestError, bounded, guarded, http_error, internal_error, request_id, validation_error
from .predict import Answer
from .requests import IMAGE_TYPES, check_content_type, parse_payload, read_body
from .schemas import ErrorBody, RegionsRequest, RegionsResponse

log = logging.getLogger("dynrefer.serve")

# Read before the ingress is defined: serve.ingress freezes (pickles) the FastAPI app and its routes' globals when
# the class is decorated.
with open(os.path.join(os.path.dirname(__file__), "static", "index.html"), encoding="utf-8") as _f:
    PAGE = _f.read()

app = FastAPI(title="DynRefer", version="0.1.0",
              description="Region captions, tags and region-text scores (DynRefer, arXiv 2405.16071).")

ERRORS = {s: {"model": ErrorBody} for s in (400, 413, 415, 422, 500, 504)}

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
