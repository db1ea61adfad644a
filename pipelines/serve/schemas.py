"""Request and response bodies as pydantic models: the OpenAPI page shows them and responses are checked
against them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


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

