"""The two working deployments: ``Preprocess`` (CPU: decode, views, pHASH, proposals) and ``Predictor`` (the model,
``@serve.batch`` across requests). Each is a thin class around :mod:`.preprocess` and :mod:`.predict`."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from ray import serve

from .config import model_config, parse_config
from .memory import PixelBudget, header_pixels, release_memory
from .predict import Answer, BatchStats, config_summary, parameter_summary, predict_items, region_results
from .preprocess import Prepared, prepare_request


@serve.deployment(name="Preprocess")
class Preprocess:
    """CPU replica: image bytes -> views, RoIs and pHASH-chosen t per region (boxes given, masks' boxes, the
    alpha channel's box, or proposals for dense). Decodes share a pixel budget (``limits.decode_pixels``)."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = parse_config(config)
        self.model_cfg = model_config(self.cfg)
        self.budget = PixelBudget(self.cfg.limits.decode_pixels)
        self.mode = self.cfg.views or self.model_cfg.views.selection
        self.proposer = None
        if self.cfg.proposals:
            import torch

            from dynrefer.proposals import load_proposer

            gpu = self.cfg.preprocess.num_gpus > 0 and torch.cuda.is_available()
            self.proposer = load_proposer(self.cfg.proposals, self.cfg.storage_options or None,
                                          device="cuda" if gpu else "cpu")

    def prepare(self, data: bytes, boxes: list[list[float]] | None, texts: list[str], masks: list[Any] | None = None,
                alpha: bool = False) -> Prepared:
        try:
            with self.budget.hold(header_pixels(data, self.cfg.limits.max_pixels)):
                return prepare_request(data, boxes, texts, self.model_cfg, self.mode, self.cfg.limits,
                                       self.proposer, self.cfg.dense, masks=masks, alpha=alpha)
        finally:
            release_memory()

    def ready(self) -> bool:
        return True


@serve.deployment(name="Predictor")
class Predictor:
    """The model behind the library's :class:`dynrefer.predictor.Predictor`; with batching on, concurrent requests
    share one forward (``@serve.batch``)."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from dynrefer.checkpoint import load_pretrained
        from dynrefer.predictor import Predictor as RegionPredictor

        self.cfg = parse_config(config)
        use_gpu = self.cfg.predictor.num_gpus > 0 and torch.cuda.is_available()
        model = load_pretrained(self.cfg.model, self.cfg.storage_options or None, device="cuda" if use_gpu else "cpu")
        self.api = RegionPredictor(model, max_regions=self.cfg.batching.max_regions_per_forward,
                                   storage_options=self.cfg.storage_options or None)
        self.has_attributes = bool(model.cfg.recognition.attributes)
        self.stats = BatchStats()
        self.lock = asyncio.Lock()  # unbatched: one forward at a time, as on one accelerator
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.predict_batched.set_max_batch_size(self.cfg.batching.max_batch_size)
        self.predict_batched.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)

    async def predict(self, prepared: Prepared) -> Answer:
        if prepared.failure is not None:
            return Answer(prepared, [])
        if self.cfg.batching.enabled:
            return await self.predict_batched(prepared)
        async with self.lock:
            return (await self._run([prepared]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def predict_batched(self, items: list[Prepared]) -> list[Answer]:
        return await self._run(items)

    async def _run(self, items: list[Prepared]) -> list[Answer]:
        preds = await asyncio.to_thread(predict_items, self.api, items, self.cfg.batching.max_regions_per_forward)
        regions = sum(len(p) for p in preds)
        self.stats.record(len(items), regions)
        return [Answer(it.without_pixels(), region_results(it, p, self.has_attributes), len(items), regions,
                       self.replica) for it, p in zip(items, preds)]

    def info(self) -> dict[str, Any]:
        model = self.api.model
        cfg = model.cfg
        return {"path": self.cfg.model, "device": str(self.api.device),
                "config": config_summary(cfg), "parameters": parameter_summary(model),
                "views": {"num_views": cfg.views.num_views, "candidate_ts": list(cfg.views.candidate_ts),
                          "selection": self.cfg.views or cfg.views.selection, "fixed_ts": list(cfg.views.fixed_ts),
                          "view_size": cfg.image_size},
                "batching": {**dataclasses.asdict(self.cfg.batching), "replica": self.replica,
                             **self.stats.summary()}}

    def ready(self) -> bool:
        return True


def replica_processes(app_name: str, deployment: str) -> dict[str, int]:
    """Process id of every live replica of a deployment, by replica id (as in a response's ``batch.replica``).

    Read from the GCS actor table: Ray's state API (``ray.util.state``) needs the dashboard, which clusters started
    with ``include_dashboard=False`` do not run. Needs ``ray.init`` on the app's cluster.
    """
    from ray._private.state import actors
    from ray.serve._private.common import DeploymentID, ReplicaID

    prefix = ReplicaID("", DeploymentID(deployment, app_name)).to_full_id_str()
    return {a["Name"][len(prefix):]: a["Pid"] for a in actors().values()
            if a["State"] == "ALIVE" and a["Name"].startswith(prefix)}
