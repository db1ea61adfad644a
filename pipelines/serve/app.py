"""The HTTP side: the FastAPI app behind ``Ingress`` (routes, OpenAPI, the page) and ``app_builder``, which binds
Ingress to the Preprocess and Predictor deployments. /v1/regions, /v1/dense and the OpenAI-compatible
/v1/chat/completions all reach the model the same way (:meth:`Ingress._answer`).

No ``from __future__ import annotations`` here: FastAPI, behind ``serve.ingress``, must see the route annotations
as types (as strings, ``request: Request`` would become a query parameter).
"""

import asyncio
import dataclasses
import logging
import math
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import chat_payload, completion, stream_events
from .config import deployment_options, parse_config
from .deployments import Predictor, Preprocess
from .errors import RequestError, bounded, cancel, guarded, http_error, internal_error, request_id, retry_after, \
    submit, validation_error
from .health import deployment_health
from .predict import Answer
from .requests import IMAGE_TYPES, JSON_TYPES, Payload, check_content_type, json_document, read_body, read_payload, \
    within
from .schemas import ChatCompletion, ChatRequest, ErrorBody, ModelCard, ModelList, RegionsForm, RegionsRequest, \
    RegionsResponse

log = logging.getLogger("dynrefer.serve")

# Read before the ingress is defined: serve.ingress freezes (pickles) the FastAPI app and its routes' globals when
# the class is decorated.
with open(os.path.join(os.path.dirname(__file__), "static", "index.html"), encoding="utf-8") as _f:
    PAGE = _f.read()

app = FastAPI(title="DynRefer", version="0.1.0",
              description="Region captions, tags and region-text scores (DynRefer, arXiv 2405.16071).")

ERRORS = {s: {"model": ErrorBody} for s in (400, 408, 413, 415, 422, 500, 503, 504)}

app.add_exception_handler(StarletteHTTPException, http_error)
app.add_exception_handler(RequestValidationError, validation_error)
app.add_exception_handler(Exception, internal_error)


def inline_schema(model: Any) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` written in place, to sit inside an OpenAPI ``requestBody``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(RegionsRequest)},
    "multipart/form-data": {"schema": inline_schema(RegionsForm)},
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}}}}
CHAT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(ChatRequest)}}}}
CHAT_RESPONSES = {**ERRORS, 404: {"model": ErrorBody}, 200: {"content": {"text/event-stream": {
    "schema": {"type": "string", "description": "with stream: true, chat.completion.chunk events, then [DONE]"}}}}}


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP in, JSON out; the work happens in Preprocess and Predictor, reached through their handles."""

    def __init__(self, preprocess: Any, predictor: Any, config: dict[str, Any]):
        self.cfg = parse_config(config)
        self.preprocess, self.predictor = preprocess, predictor
        self.created = int(time.time())
        self.lost_at = -math.inf  # when a request last found its replica dead (time.monotonic())
        # Serve notices a dead replica within a health-check period; until then /healthz reports what we saw.
        self.lost_grace_s = 2 * max(self.cfg.preprocess.health_check_period_s,
                                    self.cfg.predictor.health_check_period_s) + 1

    def _deadline(self) -> float:
        """When a request arriving now must be answered: its body, preprocessing and the model share this time."""
        return time.monotonic() + self.cfg.limits.request_timeout_s

    async def _answer(self, payload: Payload, request_id: str, deadline: float, alpha: bool = False
                      ) -> dict[str, Any]:
        """Preprocess, then the batched model, within what is left of the request timeout: a /v1/regions answer."""
        started = time.perf_counter()
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestError(504, "timeout", f"the request took longer than {self.cfg.limits.request_timeout_s:g} s")
        wait = self.cfg.limits.retry_after_s
        prepared = submit(lambda: self.preprocess.prepare.remote(payload.image, payload.boxes, payload.texts,
                                                                 payload.masks, alpha), "preprocessing", wait)
        try:
            predicted = submit(lambda: self.predictor.predict.remote(prepared), "captioning", wait)
        except RequestError:
            cancel(prepared)
            raise
        try:
            answer: Answer = await bounded(predicted, left, "captioning", upstream=[prepared], retry_after_s=wait)
        except RequestError as e:
            if e.error == "replica_lost":
                self.lost_at = time.monotonic()
            raise
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

    async def _regions(self, request: Request, request_id: str, dense: bool) -> dict[str, Any]:
        deadline = self._deadline()
        payload = await within(read_payload(request, self.cfg.limits), self.cfg.limits, deadline)
        if payload.boxes is None and payload.masks is None:
            if not dense:
                raise RequestError(422, "bad_box", "boxes: missing; give [[x1, y1, x2, y2], ...] in pixels, or "
                                                   "'masks'")
            if not self.cfg.proposals:
                raise RequestError(501, "no_proposals", "this server has no proposal model (set 'proposals:' in its "
                                                        "serve config); send 'boxes' from any detector instead")
        elif not dense and not (payload.boxes or payload.masks):
            raise RequestError(422, "bad_box", "boxes: give at least one box (or mask)")
        return await self._answer(payload, request_id, deadline)

    async def _chat(self, request: Request, request_id: str) -> Response:
        deadline = self._deadline()
        check_content_type(request.headers.get("content-type"), JSON_TYPES)
        body = await within(read_body(request, self.cfg.limits.max_body_bytes), self.cfg.limits, deadline)
        payload, stream = chat_payload(json_document("body", body.decode("utf-8", errors="replace")),
                                       self.cfg.limits, self.cfg.model_name)
        if payload.boxes == [] or payload.masks == []:
            raise RequestError(422, "bad_box", "boxes/masks: give at least one region, or leave them out and mark "
                                               "the region with the image's alpha channel")
        alpha = payload.boxes is None and payload.masks is None
        done = completion(await self._answer(payload, request_id, deadline, alpha=alpha), self.cfg.model_name,
                          int(time.time()))
        if stream:
            return StreamingResponse(stream_events(done), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(done)

    @app.post("/v1/regions", response_model=RegionsResponse, responses=ERRORS, openapi_extra=REQUEST_BODY,
              summary="Caption given boxes or masks", description="Per region (a box, or a mask's tight box with "
              "its mask_id): caption, tags with scores, category and attributes, scores of the given texts, and the "
              "views used (t and crop box). The image comes as multipart, base64 JSON or raw bytes. Points are "
              "refused (422): send a box or a mask.")
    async def regions(self, request: Request) -> Response:
        return await guarded(lambda rid: self._regions(request, rid, dense=False), request_id(request))

    @app.post("/v1/dense", response_model=RegionsResponse, responses={**ERRORS, 501: {"model": ErrorBody}},
              openapi_extra=REQUEST_BODY, summary="Dense captioning",
              description="Regions from the configured proposal model (501 without one), or from 'boxes' (any "
              "detector's) or 'masks' (any segmenter's), each with its caption.")
    async def dense(self, request: Request) -> Response:
        return await guarded(lambda rid: self._regions(request, rid, dense=True), request_id(request))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=CHAT_RESPONSES,
              openapi_extra=CHAT_BODY, summary="OpenAI-compatible: caption the region the image's alpha marks",
              description="One user image as a data: URL; its alpha channel marks the region (or the extension "
              "fields 'boxes'/'masks'). One choice per region, its content the caption; tags, category, attributes "
              "and scores in the extension field 'dynrefer'. 'stream': true answers server-sent events.")
    async def chat(self, request: Request) -> Response:
        return await guarded(lambda rid: self._chat(request, rid), request_id(request))

    @app.get("/v1/models", response_model=ModelList, summary="OpenAI-compatible: the model served here")
    async def models(self, request: Request) -> Response:
        async def listing(request_id: str) -> dict[str, Any]:
            return ModelList(data=[ModelCard(id=self.cfg.model_name, created=self.created)]).model_dump()

        return await guarded(listing, request_id(request))

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses={404: {"model": ErrorBody}},
             summary="OpenAI-compatible: one model")
    async def model_card(self, model_id: str, request: Request) -> Response:
        async def card(request_id: str) -> dict[str, Any]:
            if model_id != self.cfg.model_name:
                raise RequestError(404, "model_not_found", f"model {model_id[:60]!r} is not served here")
            return ModelCard(id=model_id, created=self.created).model_dump()

        return await guarded(card, request_id(request))

    @app.get("/healthz", summary="Health: the deployments answer and none has lost a replica",
             description="200 {\"status\": \"ok\"}; 503 with Retry-After when a deployment does not answer "
             "(unavailable), its queue is full (overloaded), or a replica died and Serve is replacing it "
             "(degraded, with each affected deployment's status).")
    async def healthz(self, request: Request) -> Response:
        async def check(request_id: str) -> Response:
            wait = retry_after(self.cfg.limits.retry_after_s)
            failure = None
            try:
                await asyncio.gather(bounded(self.predictor.ready.remote(), 10.0, "model health check"),
                                     bounded(self.preprocess.ready.remote(), 10.0, "preprocess health check"))
            except Exception as e:  # noqa: BLE001 - any failure to answer means unhealthy
                log.warning("health check %s failed: %s", request_id, e)
                failure = e.error if isinstance(e, RequestError) else "unavailable"
                if failure not in ("replica_lost", "overloaded"):  # those two are weighed with Serve's view below
                    return JSONResponse({"status": "unavailable", "request_id": request_id}, status_code=503,
                                        headers=wait)
                if failure == "replica_lost":
                    self.lost_at = time.monotonic()
            degraded = await deployment_health()
            lost_s_ago = time.monotonic() - self.lost_at
            if lost_s_ago < self.lost_grace_s:
                degraded["requests"] = {"status": "REPLICA_LOST", "message": f"a request found its replica dead "
                                                                             f"{lost_s_ago:.1f} s ago"}
            if degraded:
                log.warning("health check %s: degraded: %s", request_id, degraded)
                return JSONResponse({"status": "degraded", "deployments": degraded, "request_id": request_id},
                                    status_code=503, headers=wait)
            if failure == "overloaded":
                return JSONResponse({"status": "overloaded", "request_id": request_id}, status_code=503,
                                    headers=wait)
            return JSONResponse({"status": "ok"})

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
    wait = cfg.limits.retry_after_s
    preprocess = Preprocess.options(**deployment_options(cfg.preprocess, wait)).bind(raw)
    predictor = Predictor.options(**deployment_options(cfg.predictor, wait)).bind(raw)
    return Ingress.options(**deployment_options(cfg.ingress, wait)).bind(preprocess, predictor, raw)
