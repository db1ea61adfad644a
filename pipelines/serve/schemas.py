"""Request and response bodies as pydantic models: the OpenAPI page shows them,
the chat route validates its request with them (after the size and JSON checks of :mod:`.requests`), and the tests
read every answer back through them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Box = Annotated[list[float], Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] in pixels")]


class CocoRLE(BaseModel):
    """A COCO run-length encoded mask (column-major runs, 0s first): uncompressed counts or the compressed string."""

    model_config = ConfigDict(extra="forbid")
    size: Annotated[list[int], Field(min_length=2, max_length=2, description="[height, width]")]
    counts: list[int] | str


Mask = Annotated[str | CocoRLE, Field(description="a base64 PNG (non-zero or opaque pixels are the region), or "
                                                  "a COCO RLE object; the size of the image")]
BOXES_OR_MASKS = "give 'boxes' or 'masks' (each mask's tight box is captioned), not both; points are refused"


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
    score: float | None = None  # the proposal's score (dense captioning from proposals)
    caption: str
    caption_score: float | None = None  # the caption's probability under the LM; null until the model gives one
    tags: list[TagScore]
    text_scores: dict[str, float]
    category: LabelScore | None = None  # null when the model has no recognition categories
    attributes: list[LabelScore] | None = None  # those over the model's threshold; null without attributes
    views: list[ViewOut]
    mask_id: int | None = None  # the index of the mask this region's box came from


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
    source: str = Field(description="where the boxes came from: request, masks, alpha or proposals")
    regions: list[RegionOut]
    batch: BatchOut


class ErrorBody(BaseModel):
    error: str
    message: str
    request_id: str
    reason: str | None = None
    details: list[dict[str, Any]] | None = None


class RegionsRequest(BaseModel):
    """The JSON form of /v1/regions and /v1/dense."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"description": BOXES_OR_MASKS})
    image: str = Field(description="the image, base64 (a data: URL too); URLs are never fetched")
    boxes: list[Box] | None = None
    masks: list[Mask] | None = None
    texts: list[str] | None = Field(None, description="texts to score against each region")


class RegionsForm(BaseModel):
    """The multipart/form-data form: ``image`` a file part, the others JSON text (``masks`` may also be PNG file
    parts, one per mask)."""

    image: bytes = Field(json_schema_extra={"format": "binary"})
    boxes: str | None = Field(None, description="JSON list of [x1, y1, x2, y2] in pixels")
    masks: list[bytes] | str | None = Field(None, description="PNG file parts, or JSON text of a list of masks "
                                                              "(base64 PNGs or COCO RLE objects)")
    texts: str | None = Field(None, description="JSON list of texts to score against each region")


# ----------------------------------------------------------------------------------- OpenAI-compatible chat


class ImageURL(BaseModel):
    url: str = Field(description="a data: URL (data:image/png;base64,...); other URLs are refused, never fetched")
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


ContentPart = Annotated[ImagePart | TextPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat.completions request. The user's image (one) is the picture; its alpha channel marks the
    region (opaque = inside), unless the extension fields ``boxes`` or ``masks`` give regions; the text is not
    read (the model captions, it does not follow instructions). Other OpenAI parameters are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    boxes: list[Box] | None = Field(None, description="extension: regions as boxes, one choice each")
    masks: list[Mask] | None = Field(None, description="extension: regions as masks, one choice each")
    texts: list[str] | None = Field(None, description="extension: texts to score against each region")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A chat.completion: one choice per region, its content the caption; ``dynrefer`` (an extension) holds the
    /v1/regions answer: tags, category, attributes, scores and views."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    dynrefer: RegionsResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dynrefer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
