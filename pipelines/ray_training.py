"""What the three Ray Train programs (train, pretrain, proposals) share around their step loop.

The job keys every run has (cadence, where it lives, how it scales and retries, fault injection), the state a
checkpoint records, the ``TorchTrainer`` they all run on, and a worker's side of Ray Train: its rank and device,
resuming from the checkpoint Ray Train hands it, reports, checkpoints every rank contributes to, and the mean of
each loss over ranks. Rerunning with the same ``storage_path`` and ``name`` reuses the same ``RunConfig``, so
Ray Train resumes from that run's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Self

from dynrefer import storage
from dynrefer.config import _build
from dynrefer.storage import arrow_filesystem
from pipelines.args import absolute, read_job_file, setup_logging

log = logging.getLogger("dynrefer.ray_training")


@dataclass
class WorkerSection:
    num: int = 2
    use_gpu: bool = False
    cpus: float = 1.0  # per worker
    gpus: float = 1.0  # per worker, when use_gpu


@dataclass
class FaultSection:
    """Fault injection for drills and tests: ``rank`` exits hard once after ``after_step`` (0: off)."""

    rank: int = 1
    after_step: int = 0
    marker: str = ""  # a file created before exiting: once it exists, nothing is injected


@dataclass
class TrainerJob:
    """The keys of every Ray Train job here; each program's job adds its data, model and evaluation sections."""

    EXPORT_NAME: ClassVar[str] = "export"  # the export's name under <storage_path>/<name>/
    KIND: ClassVar[str] = "train config"  # how errors name the job file

    model: str = "tiny"  # a model config name or path
    model_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the model config
    max_steps: int = 1000  # optimizer steps
    workers: WorkerSection = field(default_factory=WorkerSection)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    storage_path: str = "runs"  # local directory or s3:// prefix for checkpoints and the export
    name: str = "dynrefer"  # run name: the same storage_path and name resume
    max_failures: int = 2
    export: str | None = None  # default: <storage_path>/<name>/<EXPORT_NAME>
    storage_options: dict[str, Any] = field(default_factory=dict)
    fault: FaultSection = field(default_factory=FaultSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> Self:
        return _build(cls, data, where or cls.KIND)

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> Self:
        return cls.from_dict(read_job_file(path, overrides), path)

    def absolute(self) -> Self:
        """Local paths made absolute, so that workers with another working directory find them."""
        return dataclasses.replace(self, storage_path=absolute(self.storage_path), export=absolute(self.export))

    def validate(self) -> None:
        for name in ("max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def export_uri(self) -> str:
        return self.export or storage.join(self.run_uri, self.EXPORT_NAME)


@dataclass
class TrainState:
    """What a checkpoint records besides the weights; ``resumed_from`` lists the step of every resume."""

    step: int = 0
    samples: int = 0
    mode: str = ""
    resumed_from: list[int] = field(default_factory=list)


# --- the driver ---------------------------------------------------------------------------------------------------

def trainer_settings(job: TrainerJob) -> dict[str, Any]:
    """TorchTrainer's scaling, backend and run settings of a job: the same storage path and name resume;
    ``max_failures`` restarts from the latest checkpoint."""
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


def fit(job: TrainerJob, loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
        datasets: dict[str, Any], dataset_config: Any = None) -> dict[str, Any]:
    """Run ``loop`` on a TorchTrainer with the job's settings; returns the final metrics, the latest checkpoint
    (under the job's run URI), the export and the run."""
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(loop, train_loop_config=loop_config, datasets=datasets,
                           dataset_config=dataset_config or DataConfig(), **trainer_settings(job))
    result = trainer.fit()
    checkpoint = storage.join(job.run_uri, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    return {"metrics": dict(result.metrics or {}), "checkpoint": checkpoint, "export": job.export_uri,
            "run": job.run_uri}


# --- the workers --------------------------------------------------------------------------------------------------

def saved_train_state(checkpoint: Any, cls: type[TrainState] = TrainState) -> TrainState | None:
    """The step counter (and resume history) of a Ray Train checkpoint, without loading any weights; ``cls`` is
    the :class:`TrainState` subclass a program checkpoints with."""
    if checkpoint is None:
        return None
    fs, path = checkpoint.filesystem, checkpoint.path
    with fs.open_input_stream(f"{path}/train_state.json") as f:
        return cls(**json.loads(f.read()))


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


def gather_on_rank0(part: Any) -> list[Any] | None:
    """Every rank's ``part`` on rank 0, in rank order (None on the other ranks)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts if dist.get_rank() == 0 else None


def write_checkpoint(saver: Any, state: TrainState, cfg: Any, metrics: dict[str, Any], rank: int,
                     writer: Any) -> None:
    """Every rank saves its part into its own directory; Ray Train gathers them into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    if writer is not None:
        writer.flush()  # the logs reach the checkpoint's step before the checkpoint does

    with tempfile.TemporaryDirectory(prefix="dynrefer-ckpt-") as directory:
        saver.save(directory)
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


@dataclass
class Worker:
    """This Ray Train worker's place in the run: rank, world size, device, and the checkpoint it resumes from."""

    rank: int
    world: int
    device: Any
    checkpoint: Any

    @classmethod
    def current(cls) -> Self:
        import ray.train
        import ray.train.torch

        setup_logging()
        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                   ray.train.get_checkpoint())

    def state(self, mode: str, cls: type[TrainState] = TrainState) -> Any:
        """The checkpoint's counters, or fresh ones; a checkpoint of another engine (``mode``) is refused."""
        state = saved_train_state(self.checkpoint, cls) or cls(mode=mode)
        if state.mode != mode:
            raise ValueError(f"the checkpoint was written by {state.mode}, this run uses {mode}")
        return state

    def restore(self, saver: Any, state: TrainState) -> None:
        """Load the checkpoint (if any) into ``saver`` (a stepper: ``load(directory)``) and record the resume."""
        if self.checkpoint is None:
            return
        with self.checkpoint.as_directory() as directory:
            saver.load(directory)
        state.resumed_from.append(state.step)
        log.info("rank %d resumed from step %d", self.rank, state.step)

    @staticmethod
    def shard(name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def writer(self, log_dir: str, state: TrainState) -> Any:
        """A TensorBoard writer on rank 0 (None elsewhere) that hides what an earlier attempt logged after the
        checkpoint this one starts from."""
        if self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter  # its flush() waits for the queued events

        return SummaryWriter(log_dir, purge_step=state.step + 1, flush_secs=10)

    def checkpointer(self, saver: Any, state: TrainState, cfg: Any, fault: FaultSection,
                     writer: Any = None) -> Callable[[dict[str, Any]], None]:
        """The loop's checkpoint hook: save with the report, then inject the configured fault (if it is due)."""

        def checkpoint(report: dict[str, Any]) -> None:
            write_checkpoint(saver, state, cfg, report, self.rank, writer)
            inject_fault(fault, self.rank, state.step)

        return checkpoint

    @staticmethod
    def report(metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)


def scalar_logger(writer: Any, prefix: str = "train") -> Callable[[int, dict[str, float]], None]:
    """The loop's ``on_step`` hook that writes every per-step metric to TensorBoard (a no-op without a writer)."""

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"{prefix}/{key}", value, step)

    return on_step
