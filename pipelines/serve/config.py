"""The Serve application's settings (its ``args``): limits, batching, deployments, checked before anything starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dynrefer import storage
from dynrefer.config import DynReferConfig, _build


@dataclass
class Limits:
    """What one request may hold; anything beyond is refused with a 4xx before any work is spent on it."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_boxes: int = 100  # boxes or masks
    max_texts: int = 64
    max_text_chars: int = 200
    request_timeout_s: float = 60.0  # from the request's arrival: reading its body, preprocessing, the model; then 504
    body_timeout_s: float = 20.0  # reading the body (a trickling upload holds an ingress slot); then 408
    retry_after_s: float = 1.0  # the Retry-After of a 503 (a full queue, a lost replica, a degraded /healthz)
    decode_pixels: int = 80_000_000  # pixels one Preprocess replica decodes at once; more wait (one always runs)


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
    memory_mb: int | None = None  # Ray's memory resource: the scheduler places the replica where this much is free
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64  # waiting for a busy replica, per caller; beyond, 503 + Retry-After at once
    health_check_period_s: float = 2.0  # how soon Serve notices a dead replica (its default is 10 s)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)


@dataclass
class Dense:
    """How proposals become regions in ``/v1/dense``."""

    min_score: float = 0.3
    max_regions: int = 50


@dataclass
class ServeConfig:
    model: str = ""  # exported model directory (local or s3://), as written by save_pretrained
    model_name: str = "dynrefer"  # the model id of /v1/models and the chat route's "model"
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
    if not cfg.model_name:
        problems.append("model_name: give the id clients name the model by")
    if cfg.views not in (None, "phash", "fixed"):
        problems.append(f"views: 'phash', 'fixed' or null, got {cfg.views!r}")
    for name in ("max_body_bytes", "max_pixels", "max_boxes", "max_texts", "max_text_chars"):
        if getattr(cfg.limits, name) < 1:
            problems.append(f"limits.{name} must be at least 1")
    for name in ("request_timeout_s", "body_timeout_s", "decode_pixels"):
        if getattr(cfg.limits, name) <= 0:
            problems.append(f"limits.{name} must be positive")
    if cfg.limits.retry_after_s < 0:
        problems.append("limits.retry_after_s must be at least 0")
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
        d = getattr(cfg, name)
        if d.max_queued_requests < 0 or d.health_check_period_s <= 0 or (d.memory_mb is not None and d.memory_mb < 1):
            problems.append(f"{name}: max_queued_requests >= 0, health_check_period_s > 0, memory_mb >= 1 or null")
    if problems:
        raise ValueError("serve config: " + "; ".join(problems))
    return cfg


def deployment_options(s: DeploymentSettings, retry_after_s: float = 1.0) -> dict[str, Any]:
    """Keyword arguments for ``Deployment.options``: bounded queues (Serve's own rejections, such as the proxy's
    when every ingress replica is full, carry ``Retry-After``) and a short health-check period."""
    autoscaling = {k: v for k, v in dataclasses.asdict(s.autoscaling).items() if v is not None}
    actor = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if s.memory_mb is not None:
        actor["memory"] = s.memory_mb * 1024 * 1024
    return {"ray_actor_options": actor, "max_ongoing_requests": s.max_ongoing_requests,
            "max_queued_requests": s.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
            "health_check_period_s": s.health_check_period_s,
            "health_check_timeout_s": max(10.0, 5 * s.health_check_period_s), "autoscaling_config": autoscaling}


def model_config(cfg: ServeConfig) -> DynReferConfig:
    """The exported model's config, read without loading its weights (the CPU deployment needs only this)."""
    return DynReferConfig.from_dict(storage.read_json(storage.join(cfg.model, "config.json"),
                                                      cfg.storage_options or None))
