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
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import pyarrow as pa

from dynrefer import storage
from dynrefer.config import merge
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
from pipelines.args import absolute, add_run_args, launch, run_overrides
from pipelines.ray_training import TrainerJob, TrainState, Worker, all_mean, fit
from pipelines.training_loop import Cadence, LoopHooks, MicroStep, epochs, run_loop

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
class ProposalJob(TrainerJob):
    """Everything a proposal training run needs; a YAML file ``configs/proposals/train_*.yaml`` gives these keys.

    The optimiser, schedule, flips, seed and the global batch (split over the workers) are the model config's
    ``train`` section, as in ``proposals.fit``.
    """

    KIND: ClassVar[str] = "proposal training config"

    model: str = "tiny"  # configs/proposals/<name>.yaml or a path
    corpus: CorpusSection = field(default_factory=CorpusSection)
    max_steps: int = 100
    checkpoint_every: int = 50
    eval: RecallSection = field(default_factory=RecallSection)
    name: str = "proposals"  # run name: the same storage_path and name resume

    def absolute(self) -> Self:
        return dataclasses.replace(super().absolute(),
                                   corpus=dataclasses.replace(self.corpus, root=absolute(self.corpus.root)))

    def validate(self) -> None:
        if not self.corpus.root:
            raise ValueError("corpus.root: give a Visual-Genome-layout corpus (e.g. the output of `dynrefer synth`)")
        super().validate()
        if not 0 < self.eval.iou <= 1:
            raise ValueError(f"eval.iou must be in (0, 1], got {self.eval.iou}")


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
    summary = fit(job, train_loop, {"job": dataclasses.asdict(job), "model": cfg.to_dict(), "with_val": "val" in data},
                  data)
    metrics = summary["metrics"]
    return {**summary, "recall_before": metrics.get("val_recall_initial"), "recall_after": metrics.get("val_recall"),
            "images_per_s": metrics.get("images_per_s"), "train_images": len(train_rows),
            "val_images": len(val_rows), "errors": len(errors)}


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
    import ray.train.torch
    import torch

    from dynrefer.proposals import (
        augment,
        build_optimizer,
        build_proposer,
        optimizer_step,
    )

    worker = Worker.current()
    job = ProposalJob.from_dict(config["job"])
    cfg = ProposalConfig.from_dict(config["model"])
    so = job.storage_options or None
    rank, world, device = worker.rank, worker.world, worker.device
    state = worker.state("ddp", ProposalState)
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
    model = build_proposer(cfg, so).to(device)
    optimizer = build_optimizer(model, cfg.train)
    saver = ProposalCheckpoint(model, optimizer, rank)
    worker.restore(saver, state)
    ddp = ray.train.torch.prepare_model(model)
    rng = np.random.default_rng([cfg.train.seed, rank, state.step])  # flips
    val = worker.shard("val") if config["with_val"] else None

    def evaluate(step: int, final: bool) -> dict[str, Any]:
        value = held_out_recall(model, cfg, val, job, device)
        state.recall[str(step)] = value
        if rank == 0:
            log.info("step %d: held-out recall@%d (IoU %.2f) %.4f", step, cfg.max_detections, job.eval.iou, value)
        return {"val_recall": value}

    def micro_step(batch: dict[str, np.ndarray], step: int, micro: int) -> MicroStep:
        examples = [augment(image, target, rng, cfg.train, device) for image, target in as_examples(batch)]
        losses = optimizer_step(ddp, optimizer, [e[0] for e in examples], [e[1] for e in examples], step,
                                job.max_steps, cfg.train)
        return MicroStep(losses, True, cfg.train.batch_size)

    def report_extras() -> dict[str, Any]:
        """The current lr, and the recall before training (a resumed run has it from its checkpoint)."""
        extras: dict[str, Any] = {"lr": optimizer.param_groups[0]["lr"]}
        if "0" in state.recall:
            extras["val_recall_initial"] = state.recall["0"]
        return extras

    batches: Iterable[dict[str, np.ndarray]] = iter(())
    if state.step < job.max_steps:
        batches = epochs(worker.shard("train"), cfg.train.batch_size // world, job.corpus.shuffle_buffer,
                         cfg.train.seed, rank, unit="images")
    hooks = LoopHooks(
        micro_step=micro_step, report=worker.report, checkpoint=worker.checkpointer(saver, state, cfg, job.fault),
        reduce=lambda mean: all_mean(mean, tuple(sorted(mean))), evaluate=evaluate if val is not None else None,
        report_extras=report_extras, on_step=lambda step, metrics: state.losses.append(metrics["loss"]))
    run_loop(batches, state, Cadence(job.max_steps, job.log_every, job.checkpoint_every, job.eval.every,
                                     "images_per_s"), hooks, rank, evaluate_first=not state.recall)
    if rank == 0:
        Proposer(model, cfg, device).save(job.export_uri, so)
        log.info("exported the proposer to %s", job.export_uri)


# --- command line -------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer proposals", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML: configs/proposals/train_*.yaml")
    p.add_argument("--corpus", help="Visual-Genome-layout root, local or s3:// (overrides corpus.root)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    add_run_args(p, "where to write the exported proposer")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    job = ProposalJob.from_yaml(args.config, **run_overrides(args), **{
        "corpus.root": args.corpus, "workers.use_gpu": True if args.gpu else None})
    return launch(args, run, job)


if __name__ == "__main__":
    sys.exit(main())
