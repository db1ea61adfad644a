"""Ray Serve application: region captions, tags and text scores over HTTP, with a web page to try it.

Three deployments, each a thin class around pure functions:

* ``Ingress`` (:mod:`.app`, FastAPI): reads and checks requests (:mod:`.requests`: Starlette's multipart parser,
  boxes or masks) and answers in JSON (:mod:`.schemas`, :mod:`.errors`); :mod:`.chat` is the OpenAI-compatible
  ``/v1/chat/completions`` and ``/v1/models``;
* ``Preprocess`` (CPU, :mod:`.deployments`): decodes the image once, no larger than its regions' views need, and
  builds every region's views, pHASH codes and model inputs with the library's functions (:mod:`.preprocess` over
  :func:`dynrefer.predictor.image_inputs`) within a pixel budget (:mod:`.memory`); it also runs the proposal
  model for ``/v1/dense`` when the config has one;
* ``Predictor``: the model behind :class:`dynrefer.predictor.Predictor`, one forward for many requests
  (``@serve.batch``, :mod:`.predict`).

Preprocess hands its arrays straight to the Predictor (a DeploymentResponse passed as an argument), so the pixels
never travel through the ingress. Run it with

    dynrefer serve --config configs/serve/local.yaml      # or: python -m pipelines.serve --config ...
    serve run configs/serve/local.yaml            # or: serve deploy configs/serve/local.yaml

Queues are bounded: a full one, or a replica lost with the request, is a 503 with ``Retry-After``
(:mod:`.errors`), and ``/healthz`` reports lost replicas (:mod:`.health`). Settings are :mod:`.config`; the
command line is :mod:`.cli`; the page is ``static/index.html``.
"""

from .app import PAGE, app, app_builder
from .chat import chat_payload, completion, stream_events
from .cli import main, parser, read_serve_file
from .config import (
    Autoscaling, Batching, Dense, DeploymentSettings, Limits, ServeConfig, deployment_options, model_config,
    parse_config,
)
from .deployments import Predictor, Preprocess, replica_processes
from .errors import RequestError, bounded, clip_text, error_response, guarded, request_id, retry_after, submit
from .health import deployment_health
from .memory import PixelBudget, release_memory
from .predict import Answer, BatchStats, predict_items, region_results
from .preprocess import Prepared, prepare_request
from .requests import Payload, check_boxes, check_masks, check_texts, parse_payload, read_body, read_payload, within
from .schemas import ChatCompletion, ChatRequest, ErrorBody, ModelList, RegionOut, RegionsRequest, RegionsResponse

__all__ = [
    "Answer", "Autoscaling", "BatchStats", "Batching", "ChatCompletion", "ChatRequest", "Dense",
    "DeploymentSettings", "ErrorBody", "Limits", "ModelList", "PAGE", "Payload", "PixelBudget", "Predictor",
    "Prepared", "Preprocess", "RegionOut", "RegionsRequest", "RegionsResponse", "RequestError", "ServeConfig", "app",
    "app_builder", "bounded", "chat_payload", "check_boxes", "check_masks", "check_texts", "clip_text",
    "completion", "deployment_health", "deployment_options", "error_response", "guarded", "main", "model_config",
    "parse_config", "parse_payload", "parser", "predict_items", "prepare_request", "read_body", "read_payload",
    "read_serve_file", "region_results", "release_memory", "replica_processes", "request_id", "retry_after",
    "stream_events", "submit", "within",
]
