"""A caption job: its settings, and its plan (which shards there are, what each holds), the same on every run so
that a rerun after a kill finishes only the missing shards."""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from dynrefer import storage
from dynrefer.caption_files import FORMATS
from dynrefer.config import DynReferConfig, _build
from dynrefer.detections import read_detections
from dynrefer.image_lists import image_records
from dynrefer.preprocess import PrepareConfig
from pipelines.args import read_job_file
from pipelines.prepare import shard_name


@dataclass
class CaptionJob:
    """What to caption, with which model, where to; a YAML file under configs/caption/ gives these keys and the
    command line overrides them."""

    model: str = ""  # exported model directory (local or s3://)
    prepared: str | None = None  # (a) the prepare stage's output
    images: str | None = None  # (b) dense: a VG root, a COCO images JSON, a .txt list of image URIs or a directory
    image_root: str | None = None  # COCO images JSON: where its file_names lie (default: the JSON's folder)
    proposals: str | None = None  # dense: an exported proposal model (dynrefer.proposals.load_proposer)
    detections: str | None = None  # dense: COCO-format detections JSON instead of a proposal model
    min_score: float = 0.0  # dense: proposals/detections scoring less are dropped
    max_regions: int = 50  # dense: at most this many regions per image, best first
    images_per_shard: int = 16  # dense: images per output shard
    out: str = ""
    split: str | None = None
    views: str = "phash"  # "phash" (greedy over pHASH codes) or "fixed" (the model config's fixed_ts)
    batch_size: int = 32
    actors: int = 1  # model replicas
    gpus_per_actor: float = 0.0  # 0: CPU actors
    cpus_per_actor: float = 1.0
    actor_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each model replica needs
    proposers: int = 1  # proposal model replicas
    gpus_per_proposer: float = 0.0
    cpus_per_proposer: float = 1.0
    input_workers: int = 1  # CPU actors that decode images and cut views (about 330 regions/s each at 224 px)
    cpus_per_input_worker: float = 1.0
    format: str = "parquet"  # or "jsonl"
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.images is not None

    @classmethod
    def from_yaml(cls, path: str | None, **overrides: Any) -> "CaptionJob":
        """The job file at ``path`` (or none) with the command line's non-None ``overrides`` set."""
        data = read_job_file(path, overrides) if path else {k: v for k, v in overrides.items() if v is not None}
        job = _build(cls, data, path or "command line")
        missing = [f"--{name}" for name in ("model", "out") if not getattr(job, name)]
        if missing:
            raise ValueError(f"caption: {', '.join(missing)} needed (on the command line or in the job file)")
        return job


def validate_job(job: CaptionJob) -> None:
    """Refuse contradictory inputs before any work starts."""
    if job.views not in ("phash", "fixed"):
        raise ValueError(f"views must be 'phash' or 'fixed', got {job.views!r}")
    if job.format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {job.format!r}")
    if (job.prepared is None) == (job.images is None):
        raise ValueError("give exactly one input: prepared (regions with boxes) or images (dense captioning)")
    if job.images is None and (job.proposals or job.detections):
        raise ValueError("proposals and detections are for images (dense captioning), not prepared regions")
    if job.images is not None and (job.proposals is None) == (job.detections is None):
        raise ValueError("dense captioning needs exactly one box source: proposals (a model) or detections (a file)")
    if min(job.max_regions, job.images_per_shard, job.batch_size, job.actors, job.input_workers, job.proposers) < 1:
        raise ValueError("max_regions, images_per_shard, batch_size, actors, input_workers and proposers must be "
                         "at least 1")


def model_config(job: CaptionJob) -> DynReferConfig:
    so = job.storage_options or None
    return DynReferConfig.from_dict(storage.read_json(storage.join(job.model, "config.json"), so))


def view_config(cfg: DynReferConfig) -> PrepareConfig:
    """Dense regions get the views the model can choose from, cut at its input size."""
    return PrepareConfig(view_size=cfg.image_size, candidate_ts=list(cfg.views.candidate_ts), hash=cfg.views.hash)


def output_name(shard: int, fmt: str) -> str:
    """The output shard's file name: ``shard-NNNNN.parquet`` or ``.jsonl``."""
    return shard_name(shard).replace(".parquet", FORMATS[fmt])


def plan_uri(job: CaptionJob, shard: int) -> str:
    return storage.join(job.out, "plan", shard_name(shard).replace(".parquet", ".json.gz"))


def read_plan(uri: str, storage_options: storage.StorageOptions | None) -> dict[str, Any]:
    """A dense shard's plan: ``{"records": [...], "errors": [...]}``."""
    return json.loads(gzip.decompress(storage.read_bytes(uri, storage_options)))


def plan(job: CaptionJob, done: set[str] | frozenset[str] = frozenset(),
         ready: Callable[[], None] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(number of input images, one work item per shard); the same inputs give the same shards on every run.

    Prepared input: one item per prepared shard. Images: shards of ``images_per_shard`` images in reading order;
    each shard not in ``done`` (output names) has its records (and detections' boxes) and the error rows of the
    detections it owns (those naming no known image go to shard 0) written to ``out/plan/shard-NNNNN.json.gz``,
    and its item carries that file's URI, so that work items (held by the driver and Ray) stay small. ``ready``
    is called once the inputs are read and usable, before anything is written (a planning error writes nothing)."""
    so = job.storage_options or None
    if not job.dense:
        shards = sorted(int(n[6:11]) for n in storage.listdir(storage.join(job.prepared, "regions"), so)
                        if n.startswith("shard-"))
        if ready is not None:
            ready()
        return 0, [{"shard": s} for s in shards]
    records = image_records(job.images, job.split, job.image_root, so)
    errors: list[dict[str, Any]] = []
    if job.detections is not None:
        errors = read_detections(records, job.detections, job.min_score, job.max_regions, so)
    num_shards = math.ceil(len(records) / job.images_per_shard)
    shard_of = {r["image_id"]: i // job.images_per_shard for i, r in enumerate(records)}
    shard_errors: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in errors:
        shard_errors[shard_of.get(e["image_id"], 0)].append(e)
    del shard_of, errors
    if ready is not None:
        ready()
    items = []
    for s in range(num_shards):
        if output_name(s, job.format) not in done:
            body = {"records": records[s * job.images_per_shard: (s + 1) * job.images_per_shard],
                    "errors": shard_errors.get(s, [])}
            storage.write_bytes(plan_uri(job, s), gzip.compress(json.dumps(body).encode(), compresslevel=1), so)
        items.append({"shard": s, "plan": plan_uri(job, s)})
    return len(records), items


def check_manifest(job: CaptionJob) -> None:
    """A rerun must caption the same inputs the same way into the same place."""
    so = job.storage_options or None
    keys = ("model", "prepared", "images", "image_root", "proposals", "detections", "min_score", "max_regions",
            "images_per_shard", "split", "views", "format")
    manifest = {k: getattr(job, k) for k in keys}
    uri = storage.join(job.out, "manifest.json")
    if storage.exists(uri, so) and storage.read_json(uri, so) != manifest:
        raise ValueError(f"{job.out} holds captions of a different job ({uri}); use a new out directory")
    storage.write_json(uri, manifest, so)
