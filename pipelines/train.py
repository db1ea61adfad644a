"""Ray Train: DynRefer trained with DeepSpeed (or plain DDP) on the prepare stage's Parquet shards.

The driver reads the prepared data's tag vocabulary (and, for a word-level LM, its caption words) into the
model config, and builds two Ray Datasets: the train split, whose map stage decodes each image once and crops
freshly drawn views for every region each epoch, and a held-out slice of the val split with the inference-time
(pHASH) views. A ``TorchTrainer`` streams them to the workers, which train with ``deepspeed.initialize``
(gloo on CPU, NCCL on GPU, the same code), report per-step metrics, write TensorBoard logs (rank 0), score
the val slice with CIDEr every ``eval.every`` steps, save checkpoints every rank contributes to, and export
the model with ``dynrefer.checkpoint.save_pretrained`` at the end. Rerunning with the same storage path and
name resumes from the latest checkpoint, as does Ray Train after a worker dies (``max_failures``).

    python -m pipelines.train --config configs/train/tiny.yaml [--ddp] [--address auto] ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynrefer import storage
from dynrefer.storage import arrow_filesystem
from dynrefer.batching import ModelInputs, build_inputs, load_images, region_rng
from dynrefer.config import DynReferConfig, ViewConfig, _build, load_config, merge
from dynrefer.tags import TagVocabulary
from pipelines.args import (absolute, add_ray_args, add_storage_args, init_ray, read_job_file, setup_logging,
                            storage_options_from_args)

log = logging.getLogger("dynrefer.train")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Columns of the prepared rows the map stage needs.
ROW_COLUMNS = ["region_id", "file", "width", "height", "box", "caption", "captions", "tags", "ts", "view_boxes",
               "rois", "phash"]
LOSSES = ("loss", "caption", "tags", "contrastive")


@dataclass
class PreparedData:
    """Which prepared shards a job reads and how Ray Data streams their views (training and pre-training)."""

    prepared: list[str] = field(default_factory=list)  # prepare-stage output directories (local or s3://)
    train_split: str = "train"
    val_split: str = "val"
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: none)
    deterministic: bool = False  # keep Ray Data's order, so a seed fixes every batch (slower)
    decode_workers: int = 2  # concurrent Ray Data tasks that decode images and crop views
    decode_batch: int = 64  # regions per such task
    decode_cpus: float = 0.5
    read_cpus: float = 0.25


@dataclass
class DataSection(PreparedData):
    max_tags: int = 1000  # tag vocabulary: the most frequent tags of tags.json
    lm_vocabulary: str = "captions"  # word-level LM: "captions" (the train captions' words) or "model" (as configured)


@dataclass
class OptimizerSection:
    lr: float = 1e-4
    weight_decay: float = 0.05  # on weights with 2+ dims; biases, norms and scalars get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


SCHEDULES = ("warmup_cosine", "epoch_cosine")


@dataclass
class ScheduleSection:
    """The learning-rate schedule, the same under DeepSpeed and DDP.

    ``warmup_cosine``: DeepSpeed's WarmupCosineLR over ``max_steps``. ``epoch_cosine``: LAVIS's schedule, as the
    official code trains: the whole first epoch at the base lr, then a cosine that steps once per epoch,
    ``lr * (1 + cos(pi * epoch / epochs)) / 2`` (it would reach 0 at ``epochs``), with no warmup.
    """

    type: str = "warmup_cosine"
    warmup_steps: int = 100
    warmup_min_ratio: float = 0.0
    warmup_type: str = "linear"
    min_ratio: float = 0.01  # the cosine ends at lr * min_ratio
    steps_per_epoch: int = 0  # epoch_cosine: optimizer steps in one epoch
    epochs: int = 0  # epoch_cosine: the cosine's length in epochs

    def __post_init__(self) -> None:
        if self.type not in SCHEDULES:
            raise ValueError(f"schedule.type must be one of {SCHEDULES}, got {self.type!r}")
        if self.type == "epoch_cosine" and (self.steps_per_epoch < 1 or self.epochs < 1):
            raise ValueError("schedule.type epoch_cosine needs steps_per_epoch >= 1 and epochs >= 1")


def epoch_cosine_factor(step: int, steps_per_epoch: int, epochs: int) -> float:
    """The lr multiplier of LAVIS's per-epoch cosine at optimizer step ``step``."""
    return 0.5 * (1.0 + math.cos(math.pi * (step // steps_per_epoch) / epochs))


def lr_scheduler(optimizer: Any, job: Any) -> Any:
    """The schedule of ``job.schedule`` on a torch optimizer (DDP), or DeepSpeed's (a client scheduler)."""
    s = job.schedule
    if getattr(s, "type", "warmup_cosine") == "epoch_cosine":
        import torch

        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: epoch_cosine_factor(step, s.steps_per_epoch, s.epochs))
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    return WarmupCosineLR(optimizer, **schedule_params(job))


@dataclass
class WorkerSection:
    num: int = 2
    use_gpu: bool = False
    cpus: float = 1.0  # per worker
    gpus: float = 1.0  # per worker, when use_gpu


@dataclass
class EvalSection:
    every: int = 0  # steps between validation passes (0: only at the end; -1: never)
    max_regions: int = 64  # size of the held-out slice, scored whole
    batch_size: int = 16


@dataclass
class FaultSection:
    """Fault injection for drills and tests: ``rank`` exits hard once after ``after_step`` (0: off)."""

    rank: int = 1
    after_step: int = 0
    marker: str = ""  # a file created before exiting: once it exists, nothing is injected


@dataclass
class RayTrainJob:
    """What every Ray Train job here shares (training and encoder pre-training); YAML files give these keys."""

    EXPORT_NAME: ClassVar[str] = "export"  # the export's name under <storage_path>/<name>/

    model: str = "tiny"  # configs/model/<name>.yaml or a path
    model_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the model config
    data: PreparedData = field(default_factory=PreparedData)
    precision: str = "fp32"  # fp32 | bf16 (autocast: bf16 matmuls over fp32 weights)
    batch_size: int = 16  # regions per worker per micro-step
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    seed: int = 0
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    workers: WorkerSection = field(default_factory=WorkerSection)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval: EvalSection = field(default_factory=EvalSection)
    storage_path: str = "runs"  # local directory or s3:// prefix for checkpoints and the export
    name: str = "dynrefer"  # run name: the same storage_path and name resume
    max_failures: int = 2
    tensorboard_dir: str | None = None  # default: <storage_path>/<name>/tensorboard (a local temp dir for s3)
    export: str | None = None  # default: <storage_path>/<name>/<EXPORT_NAME>
    storage_options: dict[str, Any] = field(default_factory=dict)
    fault: FaultSection = field(default_factory=FaultSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> Self:
        return _build(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> Self:
        return cls.from_dict(read_job_file(path, overrides), path)

    def absolute(self) -> Self:
        """Local paths made absolute, so that workers with another working directory find them."""
        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, prepared=[absolute(p) for p in self.data.prepared]),
            storage_path=absolute(self.storage_path), tensorboard_dir=absolute(self.tensorboard_dir),
            export=absolute(self.export))

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not self.data.prepared:
            raise ValueError("data.prepared: give at least one prepare-stage output directory")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def export_uri(self) -> str:
        return self.export or storage.join(self.run_uri, self.EXPORT_NAME)

    @property
    def log_dir(self) -> str:
        if self.tensorboard_dir:
            return self.tensorboard_dir
        if storage.is_remote(self.storage_path):
            return os.path.join(tempfile.gettempdir(), "dynrefer-tensorboard", self.name)
        return os.path.join(self.run_uri, "tensorboard")


@dataclass
class TrainJob(RayTrainJob):
    """Everything a training run needs; a YAML file under configs/train/ gives these keys."""

    data: DataSection = field(default_factory=DataSection)
    deepspeed: str = "configs/deepspeed/zero2.json"
    ddp: bool = False  # plain torch DDP with the same optimizer, schedule and data, for comparison
    init_from: str | None = None  # fine-tune: an export (local or s3://) whose config and weights start the run

    def absolute(self) -> Self:
        return dataclasses.replace(super().absolute(), init_from=absolute(self.init_from))

    def validate(self) -> None:
        super().validate()
        if self.data.lm_vocabulary not in ("captions", "model"):
            raise ValueError(f"data.lm_vocabulary must be 'captions' or 'model', got {self.data.lm_vocabulary!r}")


@dataclass
class TrainState:
    """What a checkpoint records besides the weights; ``resumed_from`` lists the step of every resume."""

    step: int = 0
    samples: int = 0
    mode: str = ""
    resumed_from: list[int] = field(default_factory=list)


# --- the driver: vocabularies, model config, DeepSpeed config, datasets -----------------------------------------

def region_table(paths: list[str], storage_options: storage.StorageOptions | None, columns: list[str]) -> pa.Table:
    """Some columns of every prepared row, across all the prepared directories."""
    tables = []
    for uri in paths:
        fs, path = arrow_filesystem(storage.join(uri, "regions"), storage_options)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def prepared_view_size(paths: list[str], storage_options: storage.StorageOptions | None) -> int | None:
    """The view size the rows were prepared at (their RoIs' frame), when every directory agrees on one."""
    sizes = set()
    for uri in paths:
        manifest = storage.join(uri, "manifest.json")
        if not storage.exists(manifest, storage_options):
            return None
        sizes.add(storage.read_json(manifest, storage_options).get("prepare", {}).get("view_size"))
    return sizes.pop() if len(sizes) == 1 else None


def tag_vocabulary(paths: list[str], storage_options: storage.StorageOptions | None, max_tags: int) -> list[str]:
    """The ``max_tags`` most frequent tags over the prepared directories' tags.json files."""
    counts: Counter[str] = Counter()
    for uri in paths:
        vocab = TagVocabulary.load(storage.join(uri, "tags.json"), storage_options)
        counts.update(dict(zip(vocab.tags, vocab.counts)))
    return TagVocabulary.from_counts(counts, max_size=max_tags).tags if max_tags > 0 else []


def caption_words(captions: list[str | None]) -> list[str]:
    """Words as the word-level LM tokenizer splits them (lowercase, whitespace, punctuation), most frequent first."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    counts = Counter(w for c in captions if c for w, _ in split.pre_tokenize_str(c.lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda wn: (-wn[1], wn[0]))]


def resolved_model_config(model: str, overrides: dict[str, Any]) -> DynReferConfig:
    """A model config with overrides merged in and local weight paths made absolute (workers run elsewhere)."""
    cfg = DynReferConfig.from_dict(merge(load_config(model).to_dict(), overrides))
    for section, key in (("encoder", "checkpoint"), ("qformer", "path"), ("language", "path")):
        part = getattr(cfg, section)
        path = getattr(part, key)
        if path and not storage.is_remote(path):
            setattr(part, key, os.path.abspath(path))
    return cfg


def label_names(column: pa.ChunkedArray) -> list[str]:
    """The distinct non-empty labels of a category column (strings) or attributes column (lists), sorted."""
    values = column.to_pylist()
    flat = (v for value in values for v in (value if isinstance(value, list) else [value]))
    return sorted({str(v) for v in flat if v})


def model_config(job: TrainJob, train_rows: pa.Table) -> DynReferConfig:
    """The model config with the data written in: the tag vocabulary, the train captions' words for a word-level
    LM, and the categories and attributes to recognise (unless the config lists its own)."""
    so = job.storage_options or None
    if job.init_from:  # fine-tuning keeps the export's vocabularies and labels, so its weights fit
        base = storage.read_json(storage.join(job.init_from, "config.json"), so)
        return DynReferConfig.from_dict(merge(base, job.model_overrides))
    cfg = resolved_model_config(job.model, job.model_overrides)
    cfg.tags.vocabulary = tag_vocabulary(job.data.prepared, so, job.data.max_tags)
    if job.data.lm_vocabulary == "captions" and not cfg.language.path:
        cfg.language.vocabulary = caption_words(train_rows["caption"].to_pylist())
    if not cfg.recognition.categories:
        cfg.recognition.categories = label_names(train_rows["category"])
    if not cfg.recognition.attributes:
        cfg.recognition.attributes = label_names(train_rows["attributes"])
    w = cfg.loss
    if not (w.caption > 0 or w.contrastive > 0 or (w.tags > 0 and cfg.tags.vocabulary)):
        raise ValueError("every loss is off (loss weights are 0, or tags have an empty vocabulary)")
    return cfg


def schedule_params(job: TrainJob) -> dict[str, Any]:
    """Arguments of DeepSpeed's WarmupCosineLR, which both engines use."""
    s = job.schedule
    return {"total_num_steps": job.max_steps, "warmup_num_steps": max(1, s.warmup_steps),
            "warmup_min_ratio": s.warmup_min_ratio, "cos_min_ratio": s.min_ratio, "warmup_type": s.warmup_type}


def deepspeed_config(job: TrainJob) -> dict[str, Any]:
    """The DeepSpeed JSON with every ``"auto"`` filled from the training config; any other ``"auto"`` is an error."""
    path = job.deepspeed if os.path.exists(job.deepspeed) else os.path.join(REPO, job.deepspeed)
    with open(path) as f:
        template = json.load(f)
    o = job.optimizer
    values = {
        "train_micro_batch_size_per_gpu": job.batch_size, "gradient_accumulation_steps": job.grad_accum,
        "gradient_clipping": o.grad_clip, "optimizer.params.lr": o.lr, "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps, "optimizer.params.weight_decay": o.weight_decay,
        "torch_autocast.enabled": job.precision == "bf16",
        **{f"scheduler.params.{k}": v for k, v in schedule_params(job).items()},
    }

    if job.schedule.type != "warmup_cosine":
        template.pop("scheduler", None)  # the stepper hands DeepSpeed the schedule as a client scheduler

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}") if not isinstance(v, dict) else fill(v, f"{prefix}{k}.")
                    for k, v in node.items()}
        if node == "auto":
            if prefix not in values:
                raise ValueError(f"{path}: no value for {prefix!r} = \"auto\"")
            return values[prefix]
        return node

    return fill(template, "")


def split_filter(split: str) -> str:
    if not re.fullmatch(r"[\w.-]+", split):
        raise ValueError(f"split names are words, got {split!r}")
    return f"split == '{split}'"


@dataclass(frozen=True)
class StageSettings:
    """What the view stage needs to know; travels to the Ray Data tasks with each call."""

    views: dict[str, Any]
    size: int  # the model's view size
    mode: str  # "train" (fresh random views each epoch), "phash" or "fixed"
    seed: int
    prepared_size: int | None  # the view size of the prepared RoIs
    storage_options: dict[str, Any] | None
    references: bool = False  # also pass every region's reference captions (for scoring)


def build_stage_inputs(batch: pa.Table, settings: StageSettings) -> dict[str, np.ndarray]:
    """Ray Data stage: decode each image of a batch once and crop every region's views (dynrefer.batching).

    It runs as tasks, not actors: ``streaming_split`` builds a new pipeline every epoch, and pooled task workers
    start faster than a new actor pool.
    """
    rows = batch.to_pylist()
    views = _build(ViewConfig, settings.views, "views")
    images = load_images((r["file"] for r in rows), settings.storage_options)
    # "draw" is new every epoch (Ray Data's random expression), so each sighting of a region draws anew.
    rngs = [region_rng(settings.seed, int(r["draw"] * 2**32), r["region_id"]) for r in rows] \
        if settings.mode == "train" else None
    out = build_inputs(rows, images, views, settings.size, settings.mode, rngs, settings.prepared_size).to_columns()
    if settings.references:
        refs = np.empty(len(rows), dtype=object)
        refs[:] = [list(r["captions"] or [r["caption"] or ""]) for r in rows]
        out["references"] = refs
    return out


def view_dataset(data: PreparedData, split: str, settings: StageSettings, seed: int,
                 storage_options: storage.StorageOptions | None, limit: int | None = None) -> Any:
    """One split of the prepared shards as a Ray Dataset of model inputs (views cropped by the view stage).

    In ``train`` mode the files are read in a seeded random order and each region draws new views every epoch.
    """
    import ray.data
    from ray.data import FileShuffleConfig
    from ray.data.expressions import random as random_expr

    fs, _ = arrow_filesystem(data.prepared[0], storage_options)
    paths = [arrow_filesystem(storage.join(p, "regions"), storage_options)[1] for p in data.prepared]
    train = settings.mode == "train"
    ds = ray.data.read_parquet(
        paths, filesystem=fs, columns=ROW_COLUMNS + ["split"], num_cpus=data.read_cpus,
        shuffle=FileShuffleConfig(seed=seed) if train else None,
    ).filter(expr=split_filter(split))
    if limit is not None:
        ds = ds.limit(limit)
    if train:
        ds = ds.with_column("draw", random_expr(seed=seed))
    return ds.map_batches(
        build_stage_inputs, fn_kwargs={"settings": settings}, batch_size=data.decode_batch, batch_format="pyarrow",
        num_cpus=data.decode_cpus, compute=ray.data.TaskPoolStrategy(size=data.decode_workers),
    )


def datasets(job: TrainJob, cfg: DynReferConfig, prepared_size: int | None, with_val: bool) -> dict[str, Any]:
    """The train split with views drawn afresh each epoch, and the val slice with the inference-time views."""
    so = job.storage_options or None
    stage = StageSettings(views=dataclasses.asdict(cfg.views), size=cfg.image_size, mode="train", seed=job.seed,
                          prepared_size=prepared_size, storage_options=so)
    out = {"train": view_dataset(job.data, job.data.train_split, stage, job.seed, so)}
    if with_val:
        val = dataclasses.replace(stage, mode=cfg.views.selection, references=True)
        out["val"] = view_dataset(job.data, job.data.val_split, val, job.seed, so, limit=job.eval.max_regions)
    return out


def trainer_settings(job: Any) -> dict[str, Any]:
    """TorchTrainer's scaling, backend and run settings of a job (training or pre-training): the same storage
    path and name resume; ``max_failures`` restarts from the latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    fs, path = arrow_filesystem(job.storage_path, job.storage_options or None)
    w = job.workers
    return {
        "scaling_config": ScalingConfig(num_workers=w.num, use_gpu=w.use_gpu, resources_per_worker={
            "CPU": w.cpus, **({"GPU": w.gpus} if w.use_gpu else {})}),
        "torch_config": TorchConfig(backend="nccl" if w.use_gpu else "gloo"),
        "run_config": RunConfig(name=job.name, storage_path=path, storage_filesystem=fs,
                                failure_config=FailureConfig(max_failures=job.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints)),
    }


def data_config(data: PreparedData) -> Any:
    """Ray Train's dataset settings: Ray Data's order kept when the data section asks for determinism."""
    from ray.train import DataConfig

    if not data.deterministic:
        return DataConfig()
    from ray.data import ExecutionOptions

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True))


def run(job: TrainJob, train_fn: Any = None) -> dict[str, Any]:
    """Train on the connected Ray cluster; returns a summary (final metrics, checkpoint, export).

    ``train_fn`` replaces the per-worker loop (default :func:`train_loop`) with the same datasets and configs.
    """
    from ray.train.torch import TorchTrainer

    job.validate()
    job = job.absolute()
    so = job.storage_options or None
    table = region_table(job.data.prepared, so, ["split", "caption", "category", "attributes"])
    splits = Counter(table["split"].to_pylist())
    if not splits.get(job.data.train_split):
        raise ValueError(f"{job.data.prepared}: no rows of split {job.data.train_split!r} (splits found: "
                         f"{dict(splits)}); prepare the data with its split labels")
    cfg = model_config(job, table.filter(pc.equal(table["split"], job.data.train_split)))
    with_val = job.eval.every >= 0 and splits.get(job.data.val_split, 0) > 0
    if job.eval.every >= 0 and not with_val:
        log.warning("no rows of split %r: validation is skipped", job.data.val_split)
    prepared_size = prepared_view_size(job.data.prepared, so)
    per_step = job.batch_size * job.grad_accum * job.workers.num
    log.info("%d train regions (%.1f epochs of %d steps), %d tags, %d LM words, %s", splits[job.data.train_split],
             job.max_steps * per_step / splits[job.data.train_split], job.max_steps, len(cfg.tags.vocabulary),
             len(cfg.language.vocabulary or []), "DDP" if job.ddp else job.deepspeed)
    trainer = TorchTrainer(
        train_fn or train_loop,
        train_loop_config={"job": dataclasses.asdict(job), "model": cfg.to_dict(), "with_val": with_val,
                           "deepspeed": None if job.ddp else deepspeed_config(job)},
        datasets=datasets(job, cfg, prepared_size, with_val), dataset_config=data_config(job.data),
        **trainer_settings(job),
    )
    result = trainer.fit()
    checkpoint = storage.join(job.run_uri, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    return {"metrics": result.metrics, "checkpoint": checkpoint, "export": job.export_uri, "run": job.run_uri}


# --- the workers --------------------------------------------------------------------------------------------------

def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached, so that they are built once per machine, not per run."""
    cache = os.environ.get("DYNREFER_CACHE", os.path.expanduser("~/.cache/dynrefer"))
    return os.path.join(cache, "torch_extensions")


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only: weight decay on matrices (and query tokens), none on biases, norms, scalars."""
    decay, plain = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def exclude_frozen(cfg: DynReferConfig) -> bool:
    """Whether every frozen weight can be reloaded from a weights path, so checkpoints may leave them out."""
    return bool(cfg.encoder.checkpoint) and (bool(cfg.language.path) or not cfg.language.freeze)


class DeepSpeedStepper:
    """Forward, backward and optimizer step through a DeepSpeed engine (any ZeRO stage)."""

    def __init__(self, model: Any, ds_config: dict[str, Any], backend: str, weight_decay: float,
                 scheduler: Any = None):
        """``scheduler``: a callable that builds the schedule on DeepSpeed's optimizer, when ``ds_config`` has
        none."""
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, weight_decay), config=ds_config,
            lr_scheduler=None if "scheduler" in ds_config else scheduler)
        # DeepSpeed's scheduler starts at iteration -1 (lr 0): step it once so the first update uses warmup_min_ratio.
        self.scheduler.step()
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.exclude_frozen = exclude_frozen(model.cfg)

    @property
    def module(self) -> Any:
        return self.engine.module

    def train_step(self, inputs: ModelInputs, device: Any) -> tuple[dict[str, Any], bool]:
        """One micro-batch; returns the detached losses and whether the optimizer stepped."""
        losses = self.engine(*tensors(inputs, device), inputs.captions, inputs.tags)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(losses["loss"])
        self.engine.step()
        return {k: v.detach().float() for k, v in losses.items()}, boundary

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self) -> Any:
        """Full parameters on every rank for the duration (ZeRO-3 partitions them), e.g. for generation."""
        import deepspeed

        if not self.zero3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=self.exclude_frozen)

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="deepspeed", load_module_strict=not self.exclude_frozen)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed checkpoint to resume from")


def dynrefer_arguments(inputs: ModelInputs, device: Any) -> tuple[Any, ...]:
    """DynRefer's forward arguments for a batch: views, view index, RoIs, captions, tags."""
    return (*tensors(inputs, device), inputs.captions, inputs.tags)


def dynrefer_state(model: Any) -> dict[str, Any]:
    """The tensors a DynRefer checkpoint holds (those of its export)."""
    from dynrefer.checkpoint import saved_state

    return saved_state(model)


class DDPStepper:
    """The same steps with torch DDP, torch AdamW and DeepSpeed's WarmupCosineLR (so only the engine differs).

    ``arguments`` turns a batch into the model's forward arguments and ``state`` gives the tensors a checkpoint
    keeps: DynRefer's by default; pre-training passes its own for the CLIP it trains.
    """

    def __init__(self, model: Any, device: Any, job: Any, arguments: Any = dynrefer_arguments,
                 state: Any = dynrefer_state):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.arguments, self.state = arguments, state
        self.model = model.to(device)
        self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        o = job.optimizer
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps)
        self.scheduler = lr_scheduler(self.optimizer, job)
        self.scheduler.step()  # as DeepSpeedStepper: the first update uses warmup_min_ratio
        self.grad_clip, self.accum, self.micro = o.grad_clip, job.grad_accum, 0
        self.autocast = job.precision == "bf16"
        self.device = device

    @property
    def module(self) -> Any:
        return self.model

    def train_step(self, inputs: Any, device: Any) -> tuple[dict[str, Any], bool]:
        import torch

        boundary = (self.micro + 1) % self.accum == 0
        sync = contextlib.nullcontext() if boundary else self.ddp.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                losses = self.ddp(*self.arguments(inputs, device))
            (losses["loss"] / self.accum).backward()
        self.micro += 1
        if boundary:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return {k: v.detach().float() for k, v in losses.items()}, boundary

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self) -> Any:
        return contextlib.nullcontext()

    def save(self, directory: str) -> None:
        import torch
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            os.makedirs(os.path.join(directory, "ddp"), exist_ok=True)
            torch.save({"model": self.state(self.model), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, os.path.join(directory, "ddp", "state.pt"))

    def load(self, directory: str) -> None:
        import torch

        state = torch.load(os.path.join(directory, "ddp", "state.pt"), map_location=self.device, weights_only=True)
        _, unexpected = self.model.load_state_dict(state["model"], strict=False)  # frozen weights with a path: absent
        if unexpected:
            raise RuntimeError(f"{directory}: checkpoint does not fit the model (unexpected {unexpected[:5]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def tensors(inputs: ModelInputs, device: Any) -> tuple[Any, Any, Any]:
    """:meth:`ModelInputs.to_tensors`, as the steppers' argument builders call it."""
    return inputs.to_tensors(device)


def all_mean(values: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """The mean over ranks of each loss (a loss a rank lacks counts as absent everywhere)."""
    import torch
    import torch.distributed as dist

    present = [k for k in keys if k in values]
    t = torch.tensor([values[k] for k in present], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(present, t.tolist()))


def evaluate(stepper: Any, shard: Any, batch_size: int, device: Any) -> tuple[float, list[tuple[str, str, str]]]:
    """Captions for this rank's part of the val slice, gathered, CIDEr (times 100) of the whole on rank 0 (nan
    elsewhere)."""
    import torch.distributed as dist

    from dynrefer.metrics import caption_scores

    module = stepper.module
    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    with stepper.gathered():
        module.eval()
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            inputs = ModelInputs.from_columns(batch)
            out = module.predict(*tensors(inputs, device))
            for rid, pred, refs in zip(inputs.region_ids, out, batch["references"]):
                predictions[rid] = pred.caption
                references[rid] = [str(r) for r in refs]
        module.train()
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (predictions, references))
    if dist.get_rank() != 0:
        return float("nan"), []
    for p, r in parts:
        predictions.update(p)
        references.update(r)
    examples = [(i, predictions[i], references[i][0]) for i in sorted(predictions)[:3]]
    return 100.0 * caption_scores(predictions, references, with_meteor=False)["cider"], examples


def write_checkpoint(stepper: Any, state: TrainState, cfg: DynReferConfig, metrics: dict[str, Any],
                     rank: int, writer: Any) -> None:
    """Every rank saves its part into its own directory; Ray Train gathers them into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    if writer is not None:
        writer.flush()  # the logs reach the checkpoint's step before the checkpoint does

    with tempfile.TemporaryDirectory(prefix="dynrefer-ckpt-") as directory:
        stepper.save(directory)
        if rank == 0:
            with open(os.path.join(directory, "train_state.json"), "w") as f:
                json.dump(dataclasses.asdict(state), f)
            with open(os.path.join(directory, "model_config.json"), "w") as f:
                json.dump(cfg.to_dict(), f)
        has_files = any(files for _, _, files in os.walk(directory))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if has_files else None,
                         checkpoint_dir_name=f"checkpoint-{state.step:08d}")


def inject_fault(fault: FaultSection, rank: int, step: int) -> None:
    """Exit this worker process hard, once, after its checkpoint at ``step`` is committed (a drill for resume)."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    if fault.after_step and rank == fault.rank and step == fault.after_step and not os.path.exists(fault.marker):
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        with open(fault.marker, "w") as f:
            f.write(f"rank {rank} exited after step {step}\n")
        log.warning("fault injection: rank %d exits after step %d", rank, step)
        os._exit(1)


def train_batches(shard: Any, job: TrainJob, rank: int) -> Iterator[ModelInputs]:
    """Micro-batches without end: one Ray Data epoch after another (each draws new views)."""
    epoch = 0
    while True:
        seed = job.seed * 1_000_003 + rank * 1_009 + epoch if job.data.shuffle_buffer else None
        empty = True
        for batch in shard.iter_batches(batch_size=job.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=job.data.shuffle_buffer or None,
                                        local_shuffle_seed=seed):
            empty = False
            yield ModelInputs.from_columns(batch)
        if empty:
            raise ValueError(f"an epoch gave rank {rank} no full batch of {job.batch_size}: too few train regions")
        epoch += 1


def build_model(cfg: DynReferConfig, seed: int, storage_options: storage.StorageOptions | None,
                init_from: str | None = None) -> Any:
    """The model, seeded so that every rank builds the same initial weights, or started from an export."""
    import torch
    from safetensors.torch import load as load_safetensors

    from dynrefer.checkpoint import WEIGHTS_FILE, saved_state
    from dynrefer.model import DynRefer

    torch.manual_seed(seed)
    model = DynRefer(cfg, storage_options)
    if init_from:
        state = load_safetensors(storage.read_bytes(storage.join(init_from, WEIGHTS_FILE), storage_options))
        expected = saved_state(model)
        wrong = sorted(k for k in state if k in expected and state[k].shape != expected[k].shape)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if wrong or missing or unexpected:
            raise ValueError(f"init_from {init_from}: weights do not fit the model (shapes differ: {wrong[:5]}, "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]})")
        model.load_state_dict(state, strict=False)
        model.refresh_text_embeddings()
    model.freeze_unused_heads()
    return model


def build_stepper(job: TrainJob, model: Any, ds_config: dict[str, Any] | None, device: Any) -> Any:
    """DeepSpeed with ``ds_config``, or DDP (``job.ddp``) with the same optimizer and schedule numbers."""
    if job.ddp:
        return DDPStepper(model, device, job)
    return DeepSpeedStepper(model, ds_config, "nccl" if device.type == "cuda" else "gloo", job.optimizer.weight_decay,
                            scheduler=lambda optimizer: lr_scheduler(optimizer, job))


def saved_train_state(checkpoint: Any, cls: type[TrainState] = TrainState) -> TrainState | None:
    """The step counter (and resume history) of a Ray Train checkpoint, without loading any weights; ``cls`` is
    the :class:`TrainState` subclass a program checkpoints with."""
    if checkpoint is None:
        return None
    fs, path = checkpoint.filesystem, checkpoint.path
    with fs.open_input_stream(f"{path}/train_state.json") as f:
        return cls(**json.loads(f.read()))


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    from concurrent.futures import ThreadPoolExecutor
    from itertools import chain

    import ray.train
    import ray.train.torch

    setup_logging()
    job = TrainJob.from_dict(config["job"])
    cfg = DynReferConfig.from_dict(config["model"])
    so = job.storage_options or None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mode = "ddp" if job.ddp else "deepspeed"
    checkpoint = ray.train.get_checkpoint()
    state = saved_train_state(checkpoint) or TrainState(mode=mode)
    if state.mode != mode:
        raise ValueError(f"the checkpoint was written by {state.mode}, this run uses {mode}")
    # The data pipeline starts while the model is built: the first batch is fetched in a thread.
    batches: Iterator[ModelInputs] = iter(())
    prefetch = ThreadPoolExecutor(1)
    first = prefetch.submit(lambda: None)
    if state.step < job.max_steps:
        batches = train_batches(ray.train.get_dataset_shard("train"), job, rank)
        first = prefetch.submit(next, batches)

    import torch

    from dynrefer.checkpoint import save_pretrained

    device = ray.train.torch.get_device()
    stepper = build_stepper(job, build_model(cfg, job.seed, so, job.init_from), config["deepspeed"], device)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            stepper.load(directory)
        state.resumed_from.append(state.step)
        log.info("rank %d resumed from step %d", rank, state.step)
    random.seed(job.seed * 7919 + rank * 104_729 + state.step)  # control-word dropping
    torch.manual_seed(job.seed * 7919 + rank * 104_729 + state.step + 1)  # dropout

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # its flush() waits for the queued events

        # purge_step hides what an earlier attempt logged after the checkpoint this one starts from.
        writer = SummaryWriter(job.log_dir, purge_step=state.step + 1, flush_secs=10)
    val = ray.train.get_dataset_shard("val") if config["with_val"] else None
    per_step = job.batch_size * job.grad_accum * world
    window: list[dict[str, float]] = []  # per-step metrics since the last report
    micro: list[dict[str, float]] = []  # losses of the micro-batches of the current step
    first_step = last_eval = last_checkpoint = state.step
    timed_seconds, timed_samples = 0.0, 0  # throughput over this attempt's steps after two warm-up steps
    head = first.result()
    prefetch.shutdown()
    step_start = time.perf_counter()
    for inputs in chain([head] if head is not None else [], batches):
        losses, stepped = stepper.train_step(inputs, device)
        micro.append({k: float(v) for k, v in losses.items()})
        if not stepped:
            continue
        state.step += 1
        state.samples += per_step
        mean = all_mean({k: float(np.mean([m[k] for m in micro])) for k in micro[0]}, LOSSES)
        micro = []
        if not all(math.isfinite(v) for v in mean.values()):
            raise FloatingPointError(f"step {state.step}: non-finite loss {mean}")
        now = time.perf_counter()
        metrics = {**mean, "lr": stepper.lr(), "samples_per_s": per_step / (now - step_start)}
        if state.step > first_step + 2:
            timed_seconds, timed_samples = timed_seconds + now - step_start, timed_samples + per_step
        window.append(metrics)
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"train/{key}", value, state.step)
        final = state.step >= job.max_steps
        report: dict[str, Any] = {}
        if val is not None and ((job.eval.every > 0 and state.step - last_eval >= job.eval.every) or final):
            score, examples = evaluate(stepper, val, job.eval.batch_size, device)
            last_eval = state.step
            report["val_cider"] = score
            if writer is not None:
                writer.add_scalar("val/cider", score, state.step)
                writer.add_text("val/examples", "\n\n".join(f"{i}: {p} (ref: {r})" for i, p, r in examples),
                                state.step)
                log.info("step %d: val CIDEr %.2f", state.step, score)
        save = state.step - last_checkpoint >= job.checkpoint_every or final
        if state.step % job.log_every == 0 or save:
            report.update({k: float(np.mean([m[k] for m in window])) for k in window[-1]})
            report.update(step=state.step, samples=state.samples)
            if timed_samples:
                report["throughput"] = timed_samples / timed_seconds
            window = []
            if rank == 0:
                log.info("step %d: %s", state.step, {k: round(v, 4) for k, v in report.items()})
        if save:
            write_checkpoint(stepper, state, cfg, report, rank, writer)
            last_checkpoint = state.step
            inject_fault(job.fault, rank, state.step)
        elif report:
            ray.train.report(report)
        if final:
            break
        step_start = time.perf_counter()  # evaluation and checkpoints do not count as step time
    with stepper.gathered():
        if rank == 0:
            save_pretrained(stepper.module, job.export_uri, so)
    if writer is not None:
        writer.close()


# --- command line -------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML under configs/train/")
    p.add_argument("--prepared", nargs="+", help="prepare-stage output directories (override data.prepared)")
    p.add_argument("--storage-path", help="checkpoint and export root, local or s3://")
    p.add_argument("--name", help="run name (the same storage path and name resume)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workers", type=int, help="number of training workers")
    p.add_argument("--deepspeed", help="DeepSpeed JSON under configs/deepspeed/")
    p.add_argument("--ddp", action="store_true", help="plain torch DDP instead of DeepSpeed")
    p.add_argument("--export", help="where to write the exported model")
    p.add_argument("--encoder-checkpoint", help="open_clip checkpoint of the frozen encoder (overrides the config's)")
    add_ray_args(p)
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    job = TrainJob.from_yaml(
        args.config, **{"data.prepared": args.prepared, "storage_path": args.storage_path, "name": args.name,
                        "max_steps": args.max_steps, "workers.num": args.workers, "deepspeed": args.deepspeed,
                        "ddp": True if args.ddp else None, "export": args.export,
                        "model_overrides.encoder.checkpoint": args.encoder_checkpoint,
                        "storage_options": storage_options_from_args(args) or None})
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    init_ray(args, worker_logs=True)
    summary = run(job)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
