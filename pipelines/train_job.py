"""The job files of the DynRefer Ray Train programs (training and encoder pre-training): their sections.

A YAML file under configs/train/ or configs/pretrain/ gives these keys; unknown keys are refused, so that a typo
fails before a cluster is asked for workers.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Self

from dynrefer import storage
from dynrefer.config import DynReferConfig, load_config, merge
from pipelines.args import absolute
from pipelines.ray_training import TrainerJob


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


@dataclass
class EvalSection:
    every: int = 0  # steps between validation passes (0: only at the end; -1: never)
    max_regions: int = 64  # size of the held-out slice, scored whole
    batch_size: int = 16
    # Choose the export's tag threshold on the val slice: the lowest whose tag precision reaches this (None: keep
    # the model config's tags.threshold, the official 0.7).
    tag_precision: float | None = None


@dataclass
class RayTrainJob(TrainerJob):
    """What the DynRefer jobs share (training and encoder pre-training): prepared data, batches, optimizer."""

    data: PreparedData = field(default_factory=PreparedData)
    precision: str = "fp32"  # fp32 | bf16 (autocast: bf16 matmuls over fp32 weights)
    batch_size: int = 16  # regions per worker per micro-step
    grad_accum: int = 1
    seed: int = 0
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tensorboard_dir: str | None = None  # default: <storage_path>/<name>/tensorboard (a local temp dir for s3)

    def absolute(self) -> Self:
        return dataclasses.replace(
            super().absolute(), data=dataclasses.replace(self.data, prepared=[absolute(p) for p in self.data.prepared]),
            tensorboard_dir=absolute(self.tensorboard_dir))

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not self.data.prepared:
            raise ValueError("data.prepared: give at least one prepare-stage output directory")
        super().validate()
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

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


def resolved_model_config(model: str, overrides: dict[str, Any], base: dict[str, Any] | None = None
                          ) -> DynReferConfig:
    """A model config (``base``, an export's config, instead of ``model`` when given) with overrides merged in and
    local weight paths made absolute (workers run elsewhere)."""
    cfg = DynReferConfig.from_dict(merge(base if base is not None else load_config(model).to_dict(), overrides))
    for section, key in (("encoder", "checkpoint"), ("qformer", "path"), ("language", "path")):
        part = getattr(cfg, section)
        path = getattr(part, key)
        if path and not storage.is_remote(path):
            setattr(part, key, os.path.abspath(path))
    return cfg
