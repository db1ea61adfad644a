"""The OpenAI-compatible face of the app: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Clients that speak OpenAI's API (the official ``openai`` package, ``curl`` scripts written for it) send one image
as a ``data:`` URL (never fetched from the network) whose alpha channel marks the region, the convention of the
region captioners that serve this way; the extension fields ``boxes`` or ``masks`` name regions instead. The
answer is a ``chat.completion`` with one choice per region whose content is the caption, the full /v1/regions
answer (tags, category, attributes, scores, views) in the extension field ``dynrefer``. ``stream: true`` sends
the same as server-sent ``chat.completion.chunk`` events. The request goes through the same Preprocess and batched
Predictor as /v1/regions.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from pydantic import ValidationError

from .config import Limits
from .errors import RequestError, clip_text
from .requests import Payload, check_texts, decode_base64, region_prompts
from .schemas import ChatRequest

EXTENSIONS = ("boxes", "masks", "texts", "points", "point")


def chat_payload(doc: Any, limits: Limits, model_name: str) -> tuple[Payload, bool]:
    """(payload, stream) of a chat.completions request: the one user image, its regions, the extension texts."""
    if not isinstance(doc, dict):
        raise RequestError(400, "bad_request", "body: expected a JSON object")
    boxes, masks = region_prompts(doc, limits)  # checked (hostile numbers too) before pydantic sees the rest
    texts = check_texts(doc.get("texts"), limits)
    try:
        req = ChatRequest.model_validate({k: v for k, v in doc.items() if k not in EXTENSIONS})
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(422, "bad_request", f"{clip_text(where, 80)}: {clip_text(first['msg'], 160)}") from None
    if req.model != model_name:
        raise RequestError(404, "model_not_found", f"model {clip_text(req.model)!r} is not served here; GET "
                                                   f"/v1/models lists {model_name!r}")
    urls = [part.image_url.url for m in req.messages if m.role == "user" and isinstance(m.content, list)
            for part in m.content if part.type == "image_url"]
    if not urls:
        raise RequestError(422, "bad_image", "no image: send one user content part {'type': 'image_url', "
                                             "'image_url': {'url': 'data:image/png;base64,...'}}")
    if len(urls) > 1:
        raise RequestError(422, "bad_image", f"{len(urls)} images; send one image per request")
    url = urls[0]
    if not url.startswith("data:"):
        raise RequestError(422, "url_not_fetched", "this server never fetches URLs; send the image as a data: URL "
                                                   "(data:image/png;base64,...)")
    if ";base64," not in url.partition(",")[0] + ",":
        raise RequestError(422, "bad_image", "image_url: expected a base64 data: URL (data:image/png;base64,...)")
    return Payload(decode_base64(url, "image_url"), boxes, texts, masks), req.stream


def completion(answer: dict[str, Any], model_name: str, created: int) -> dict[str, Any]:
    """A chat.completion from a /v1/regions answer: one choice per region, its content the caption."""
    captions = [r["caption"] for r in answer["regions"]]
    words = sum(len(c.split()) for c in captions)
    return {"id": f"chatcmpl-{answer['request_id']}", "object": "chat.completion", "created": created,
            "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop",
                         "logprobs": None} for i, c in enumerate(captions)],
            "usage": {"prompt_tokens": 0, "completion_tokens": words, "total_tokens": words},
            "dynrefer": answer}


def stream_events(done: dict[str, Any]) -> Iterator[str]:
    """The completion as server-sent events: per choice the role, then the caption word by word, then its finish;
    the last chunk carries usage and the ``dynrefer`` extension; then ``[DONE]``."""
    head = {k: done[k] for k in ("id", "created", "model")}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    for choice in done["choices"]:
        i, words = choice["index"], choice["message"]["content"].split(" ")
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for k, word in enumerate(words):
            if word or k:
                yield chunk([{"index": i, "delta": {"content": word if k == 0 else " " + word},
                              "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "finish_reason": "stop"}])
    yield chunk([], usage=done["usage"], dynrefer=done["dynrefer"])
    yield "data: [DONE]\n\n"
