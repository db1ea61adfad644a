"""Ray Train: the class-agnostic proposal model (``dynrefer.proposals``) trained on a Visual-Genome-layout corpus.

The corpus is read as it is laid out (``dynrefer.datasets.read_visual_genome``, e.g. what ``dynrefer synth``
writes): a detector trains on whole images with all their boxes, which is what a VG record is, whereas the prepare
stage's rows are regions that would first have to be grouped back into images. Ray Data tasks decode and resize
the images (``proposals.load_training_example``) and stream them to a ``TorchTrainer`` whose workers train with
DDP (gloo on CPU, NCCL on GPU) through ``proposals.optimizer_step`` and ``proposals.augment``, the same step as
``proposals.fit``. Held-out recall (IoU 0.5, ``max_detections`` proposals) is measured before training, every
``eval.every`` steps and at the end. Checkpoints go to ``<storage_path>/<name>``: rerunning with the same storage
path and name resumes, as does Ray Train after a worker dies (``max_failures``). The model is exported with
``Proposer.save`` to ``<storage_path>/<name>/export``, which ``proposals.load_proposer`` loads.

    python -m pipelines.proposals --config configs/proposals/train_tiny.yaml --corpus CORPUS [--address auto] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import pyarrow as pa

from dynrefer import storage
from dynrefer.config import _build, merge
from dynrefer.datasets import read_visual_genome
from dynrefer.proposals import (
    REGION_LABEL,
    WEIGHTS_FILE,
    ProposalConfig,
    Proposer,
    load_proposal_config,
    load_training_example,
    recall,
)
from pipelines.args import (
    absolute,
    add_ray_args,
    add_storage_args,
    init_ray,
    read_job_file,
    setup_logging,
    storage_options_from_args,
)
from pipelines.train import (
    FaultSection,
    TrainState,
    WorkerSection,
    all_mean,
    inject_fault,
    saved_train_state,
    trainer_settings,
    write_checkpoint,
)

log = logging.getLogger("dynrefer.proposals")

OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class CorpusSection:
    """Where the images and boxes come from and how Ray Data streams them."""

    root: str = ""  # a Visual-Genome-layout root (local or s3://) with splits/<split>.json
    train_split: str = "train"
    val_split: str = "val"
    shuffle_buffer: int = 32  # images in each worker's local shuffle buffer (0: none)
    decode_workers: int = 2  # concurrent Ray Data tasks that decode and resize images
    decode_batch: int = 8  # images per such task
    decode_cpus: float = 0.25


@dataclass
class RecallSection:
    """Held-out recall: before training, every ``every`` steps (0: only before and at the end; -1: never)."""

    every: int = 0
    max_images: int = 64  # the first images of the val split
    batch_size: int = 8
    iou: float = 0.5


@dataclass
class ProposalJob:
    """Everything a proposal training run needs; a YAML file ``configs/proposals/train_*.yaml`` gives these keys.

    The optimiser, schedule, flips, seed and the global batch (split over the workers) are the model config's
    ``train`` section, as in ``proposals.fit``.
    """

    model: str = "tiny"  # configs/proposals/<name>.yaml or a path
    model_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the model config
    corpus: CorpusSection = field(default_factory=CorpusSection)
    max_steps: int = 100
    workers: WorkerSection = field(default_factory=WorkerSection)
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval: RecallSection = field(default_factory=RecallSection)
    storage_path: str = "runs"  # local directory or s3:// prefix for checkpoints and the export
    name: str = "proposals"  # run name: the same storage_path and name resume
    max_failures: int = 2
    export: str | None = None  # default: <storage_path>/<name>/export
    storage_options: dict[str, Any] = field(default_factory=dict)
    fault: FaultSection = field(default_factory=FaultSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "proposal training config") -> Self:
        return _build(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> Self:
        return cls.from_dict(read_job_file(path, overrides), path)

    def absolute(self) -> Self:
        """Local paths made absolute, so that workers with another working directory find them."""
        return dataclasses.replace(self, corpus=dataclasses.replace(self.corpus, root=absolute(self.corpus.root)),
                                   storage_path=absolute(self.storage_path), export=absolute(self.export))

    def validate(self) -> None:
        if not self.corpus.root:
            raise ValueError("corpus.root: give a Visual-Genome-layout corpus (e.g. the output of `dynrefer synth`)")
        for name in ("max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.eval.iou <= 1:
            raise ValueError(f"eval.iou must be in (0, 1], got {self.eval.iou}")

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def export_uri(self) -> str:
        return self.export or storage.join(self.run_uri, "export")


@dataclass
class ProposalState(TrainState):
    """A checkpoint's counters, with the loss of every step and the held-out recall by step (``"0"``: before
    training), so that a resumed run still reports where it started."""

    losses: list[float] = field(default_factory=list)
    recall: dict[str, float] = field(default_factory=dict)


# --- the driver ---------------------------------------------------------------------------------------------------

def proposal_config(job: ProposalJob) -> ProposalConfig:
    """The model config with the job's overrides merged in and a local ``weights`` path made absolute."""
    cfg = ProposalConfig.from_dict(merge(load_proposal_config(job.model).to_dict(), job.model_overrides))
    if cfg.weights and not storage.is_remote(cfg.weights):
        cfg.weights = os.path.abspath(cfg.weights)
    if cfg.train.batch_size % job.workers.num:
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}, the global batch) must be a multiple of "
                         f"workers.num ({job.workers.num})")
    return cfg


def corpus_rows(root: str, split: str, storage_options: storage.StorageOptions | None
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per image of ``split`` (``image_id``, ``file``, ``boxes``), and an error message for every malformed
    image or region entry, which is left out (and reported) rather than failing the run."""
    rows, errors = [], []
    for record in read_visual_genome(root, split=split, storage_options=storage_options, use_objects=False,
                                     record_errors=True):
        if "error" in record:
            errors.append(f"image {record['image_id']}: {record['error']}")
            continue
        boxes = []
        for region in record["regions"]:
            if "error" in region:
                errors.append(f"image {record['image_id']} region {region.get('region_id')}: {region['error']}")
            else:
                boxes.append([float(v) for v in region["box"]])
        rows.append({"image_id": str(record["image_id"]), "file": record["file"], "boxes": boxes})
    return rows, errors


def decode_examples(batch: pa.Table, cfg: dict[str, Any], storage_options: dict[str, Any] | None
                    ) -> dict[str, np.ndarray]:
    """Ray Data stage: each image decoded and resized for the detector, as uint8 (3, H, W), with its boxes (N, 4)
    in the resized pixels (``proposals.load_training_example``)."""
    config = ProposalConfig.from_dict(cfg)
    images, boxes = [], []
    for row in batch.to_pylist():
        record = {"file": row["file"], "regions": [{"box": b} for b in row["boxes"]]}
        image, target = load_training_example(record, config, storage_options)
        images.append(image.numpy())
        boxes.append(target["boxes"].numpy().reshape(-1, 4))
    return {"image_id": np.array(batch["image_id"].to_pylist()), "image": _objects(images),
            "boxes": _objects(boxes)}


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-d object array of differently shaped arrays (Ray Data stores it as a variable-shaped tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def example_dataset(rows: list[dict[str, Any]], cfg: ProposalConfig, corpus: CorpusSection,
                    storage_options: storage.StorageOptions | None) -> Any:
    """The rows as a Ray Dataset of decoded examples, decoded by a bounded pool of CPU tasks as they stream."""
    import ray.data

    return ray.data.from_items(rows).map_batches(
        decode_examples, fn_kwargs={"cfg": cfg.to_dict(), "storage_options": storage_options},
        batch_size=corpus.decode_batch, batch_format="pyarrow", num_cpus=corpus.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=corpus.decode_workers))


def run(job: ProposalJob) -> dict[str, Any]:
    """Train on the connected Ray cluster; returns a summary (metrics, recall before/after, checkpoint, export)."""
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    job.validate()
    job = job.absolute()
    so = job.storage_options or None
    cfg = proposal_config(job)
    train_rows, errors = corpus_rows(job.corpus.root, job.corpus.train_split, so)
    if not train_rows:
        raise ValueError(f"{job.corpus.root}: no usable images in split {job.corpus.train_split!r} "
                         f"({len(errors)} errors{': ' + errors[0] if errors else ''})")
    data = {"train": example_dataset(train_rows, cfg, job.corpus, so)}
    val_rows: list[dict[str, Any]] = []
    if job.eval.every >= 0:
        val_rows, val_errors = corpus_rows(job.corpus.root, job.corpus.val_split, so)
        errors += val_errors
        val_rows = val_rows[:job.eval.max_images]
        if val_rows:
            data["val"] = example_dataset(val_rows, cfg, job.corpus, so)
        else:
            log.warning("no images of split %r: held-out recall is skipped", job.corpus.val_split)
    for message in errors[:10]:
        log.warning("left out: %s", message)
    if len(errors) > 10:
        log.warning("... and %d more malformed entries left out", len(errors) - 10)
    log.info("%d train images (%.1f epochs of %d steps of %d), %d held out, %s", len(train_rows),
             job.max_steps * cfg.train.batch_size / len(train_rows), job.max_steps, cfg.train.batch_size,
             len(val_rows), cfg.architecture)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": dataclasses.asdict(job), "model": cfg.to_dict(),
                                       "with_val": "val" in data},
        datasets=data, dataset_config=DataConfig(), **trainer_settings(job))
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    checkpoint = storage.join(job.run_uri, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    return {"metrics": metrics, "recall_before": metrics.get("val_recall_initial"),
            "recall_after": metrics.get("val_recall"), "images_per_s": metrics.get("images_per_s"),
            "train_images": len(train_rows), "val_images": len(val_rows), "errors": len(errors),
            "checkpoint": checkpoint, "export": job.export_uri, "run": job.run_uri}


# --- the workers --------------------------------------------------------------------------------------------------

class ProposalCheckpoint:
    """The detector's weights (safetensors) and the optimiser's state in a checkpoint directory (rank 0 writes)."""

    def __init__(self, model: Any, optimizer: Any, rank: int) -> None:
        self.model, self.optimizer, self.rank = model, optimizer, rank

    def save(self, directory: str) -> None:
        import torch
        from safetensors.torch import save_file

        if self.rank == 0:
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
            torch.save(self.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))

    def load(self, directory: str) -> None:
        import torch
        from safetensors.torch import load_file

        device = next(self.model.parameters()).device
        self.model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE), device=str(device)))
        self.optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location=device,
                                                  weights_only=True))


def example_batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int, rank: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Batches without end: one Ray Data epoch after another, each locally shuffled with its own seed."""
    epoch = 0
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=shuffle_buffer or None,
                                        local_shuffle_seed=seed * 1_000_003 + rank * 1_009 + epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"an epoch gave rank {rank} no full batch of {batch_size} images: too few train images")
        epoch += 1


def as_examples(batch: dict[str, np.ndarray]) -> list[tuple[Any, dict[str, Any]]]:
    """A streamed batch as ``(image (3, H, W) uint8, target)`` pairs, as ``proposals.load_training_example``
    gives them (Ray Data hands out read-only arrays; torch needs writable ones)."""
    import torch

    out = []
    for image, boxes in zip(batch["image"], batch["boxes"]):
        boxes = torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        out.append((torch.from_numpy(np.require(image, requirements="W")),
                    {"boxes": boxes, "labels": torch.full((len(boxes),), REGION_LABEL, dtype=torch.int64)}))
    return out


def shard_recall(proposer: Proposer, batches: Iterable[dict[str, np.ndarray]], iou: float) -> tuple[float, int]:
    """Recall of ``proposer``'s boxes on some streamed held-out images, and the number of ground-truth boxes.

    The images come resized for the detector, so the proposer's own resize keeps them as they are and boxes and
    ground truth share pixels."""
    from PIL import Image

    proposals, truth = [], []
    for batch in batches:
        images = [Image.fromarray(np.ascontiguousarray(np.asarray(a).transpose(1, 2, 0))) for a in batch["image"]]
        proposals += [[box for box, _ in found] for found in proposer.propose_batch(images)]
        truth += [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in batch["boxes"]]
    return recall(proposals, truth, iou), sum(len(t) for t in truth)


def held_out_recall(model: Any, cfg: ProposalConfig, shard: Any, job: ProposalJob, device: Any) -> float:
    """Recall over every rank's part of the held-out images (each rank scores its own part)."""
    import torch
    import torch.distributed as dist

    batches = shard.iter_batches(batch_size=job.eval.batch_size, batch_format="numpy")
    value, boxes = shard_recall(Proposer(model, cfg, device), batches, job.eval.iou)
    counts = torch.tensor([value * boxes, boxes], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return float(counts[0] / counts[1]) if counts[1] else 0.0


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from dynrefer.proposals import (
        augment,
        build_optimizer,
        build_proposer,
        optimizer_step,
    )

    setup_logging()
    job = ProposalJob.from_dict(config["job"])
    cfg = ProposalConfig.from_dict(config["model"])
    so = job.storage_options or None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    checkpoint = ray.train.get_checkpoint()
    state = saved_train_state(checkpoint, ProposalState) or ProposalState(mode="ddp")
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
    model = build_proposer(cfg, so).to(device)
    optimizer = build_optimizer(model, cfg.train)
    saver = ProposalCheckpoint(model, optimizer, rank)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saver.load(directory)
        state.resumed_from.append(state.step)
        log.info("rank %d resumed from step %d", rank, state.step)
    ddp = ray.train.torch.prepare_model(model)
    rng = np.random.default_rng([cfg.train.seed, rank, state.step])  # flips
    val = ray.train.get_dataset_shard("val") if config["with_val"] else None

    def evaluate(report: dict[str, Any]) -> None:
        value = held_out_recall(model, cfg, val, job, device)
        state.recall[str(state.step)] = value
        report["val_recall"] = value
        if rank == 0:
            log.info("step %d: held-out recall@%d (IoU %.2f) %.4f", state.step, cfg.max_detections, job.eval.iou,
                     value)

    initial: dict[str, Any] = {}
    if val is not None and not state.recall:  # before training (a resumed run has its start's recall)
        evaluate(initial)
    per_worker = cfg.train.batch_size // world
    batches = example_batches(ray.train.get_dataset_shard("train"), per_worker, job.corpus.shuffle_buffer,
                              cfg.train.seed, rank) if state.step < job.max_steps else iter(())
    window: list[dict[str, float]] = []
    first_step, last_checkpoint, last_eval = state.step, state.step, state.step
    timed_seconds, timed_images = 0.0, 0  # throughput after two warm-up steps of this attempt
    step_start = time.perf_counter()
    for batch in batches:
        examples = [augment(image, target, rng, cfg.train, device) for image, target in as_examples(batch)]
        losses = optimizer_step(ddp, optimizer, [e[0] for e in examples], [e[1] for e in examples], state.step,
                                job.max_steps, cfg.train)
        state.step += 1
        state.samples += cfg.train.batch_size
        mean = all_mean(losses, tuple(sorted(losses)))
        if not all(math.isfinite(v) for v in mean.values()):
            raise FloatingPointError(f"step {state.step}: non-finite loss {mean}")
        state.losses.append(mean["loss"])
        now = time.perf_counter()
        if state.step > first_step + 2:
            timed_seconds, timed_images = timed_seconds + now - step_start, timed_images + cfg.train.batch_size
        window.append(mean)
        final = state.step >= job.max_steps
        report: dict[str, Any] = dict(initial)
        initial = {}
        if val is not None and ((job.eval.every > 0 and state.step - last_eval >= job.eval.every) or final):
            evaluate(report)
            last_eval = state.step
        save = state.step - last_checkpoint >= job.checkpoint_every or final
        if state.step % job.log_every == 0 or save:
            report.update({k: float(np.mean([w[k] for w in window])) for k in window[-1]})
            report.update(step=state.step, samples=state.samples, lr=optimizer.param_groups[0]["lr"])
            if timed_images:
                report["images_per_s"] = timed_images / timed_seconds
            window = []
            if rank == 0:
                log.info("step %d: %s", state.step, {k: round(v, 4) for k, v in report.items()})
        if report and "0" in state.recall:
            report["val_recall_initial"] = state.recall["0"]
        if save:
            write_checkpoint(saver, state, cfg, report, rank, None)
            last_checkpoint = state.step
            inject_fault(job.fault, rank, state.step)
        elif report:
            ray.train.report(report)
        if final:
            break
        step_start = time.perf_counter()  # evaluation and checkpoints do not count as step time
    if rank == 0:
        Proposer(model, cfg, device).save(job.export_uri, so)
        log.info("exported the proposer to %s", job.export_uri)


# --- command line -------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer proposals", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML: configs/proposals/train_*.yaml")
    p.add_argument("--corpus", help="Visual-Genome-layout root, local or s3:// (overrides corpus.root)")
    p.add_argument("--storage-path", help="checkpoint and export root, local or s3://")
    p.add_argument("--name", help="run name (the same storage path and name resume)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workers", type=int, help="number of training workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--export", help="where to write the exported proposer")
    add_ray_args(p)
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    job = ProposalJob.from_yaml(
        args.config, **{"corpus.root": args.corpus, "storage_path": args.storage_path, "name": args.name,
                        "max_steps": args.max_steps, "workers.num": args.workers,
                        "workers.use_gpu": True if args.gpu else None, "export": args.export,
                        "storage_options": storage_options_from_args(args) or None})
    init_ray(args, worker_logs=True)
    summary = run(job)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
