"""Ray Train: contrastive pre-training of the encoder's open_clip model on the prepare stage's region crops.

DynRefer's CLIP is frozen, and the built-in tiny one has no published weights: this program trains it on
region crops (each region's t=0 view, or as augmentation a randomly drawn larger view) and their captions
with open_clip's ``ClipLoss``, on a ``TorchTrainer`` with DDP (gloo on CPU, NCCL on GPU, the same code). The
data pipeline (``pipelines.train_data``), optimizer and schedule (``pipelines.steppers``), step loop, checkpoints
and resume (``pipelines.training_loop``, ``pipelines.ray_training``) are those of ``pipelines.train``: rerunning
with the same storage path and name resumes. Held-out region -> caption retrieval on the val split is logged at the
start and every ``eval.every`` steps. The result is an ordinary open_clip checkpoint (default
``<storage_path>/<name>/clip.safetensors``) that ``encoder.checkpoint`` of a model config loads.

    python -m pipelines.pretrain --config configs/pretrain/tiny.yaml [--address auto] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np

from dynrefer import storage
from dynrefer.batching import ModelInputs
from dynrefer.config import ViewConfig
from dynrefer.pretraining import CHECKPOINT_SUFFIXES
from pipelines.args import add_run_args, launch, run_overrides
from pipelines.ray_training import Worker, all_mean, fit, gather_on_rank0, scalar_logger
from pipelines.steppers import DDPStepper, default_extensions_dir
from pipelines.train_data import (StageSettings, data_config, prepared_view_size, region_table, split_counts,
                                  train_batches, view_dataset)
from pipelines.train_job import EvalSection, RayTrainJob, resolved_model_config
from pipelines.training_loop import Cadence, LoopHooks, MicroStep, run_loop

log = logging.getLogger("dynrefer.pretrain")

METRICS = ("loss", "logit_scale")


@dataclass
class AugmentSection:
    """Instead of its t=0 view, a region is shown with probability ``larger`` through one larger view, its t drawn
    from ``candidate_ts`` afresh each time the region is seen (0: t=0 views only)."""

    larger: float = 0.3
    candidate_ts: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])


@dataclass
class TextSection:
    """What the texts say. With ``facets`` (``synthetic``: the built-in corpus's colour, pattern and shape), a step
    pairs its regions with short phrases naming one drawn set of facets ("the red star"), except for a share
    ``full_caption`` of steps, which use the captions; ``weights`` weighs the sets of facets (in
    ``TextFacets.subsets`` order; null: uniform). Without facets every text is the caption."""

    facets: str | None = None
    full_caption: float = 0.25
    weights: list[float] | None = None

    def resolved(self) -> Any:
        """The :class:`dynrefer.pretraining.TextFacets`, or None."""
        from dynrefer.pretraining import synthetic_text_facets

        if self.facets is None:
            return None
        if self.facets == "synthetic":
            return synthetic_text_facets()
        raise ValueError(f"text.facets: 'synthetic' or null, got {self.facets!r}")


@dataclass
class ProbeSection:
    """Linear probes of the encoder (``dynrefer.probe``): a logistic regression per facet (``synthetic``: shape,
    colour, pattern and size from the rows' category and attributes; or a mapping facet -> vocabulary, null for
    the category) fitted on the t=0 crops of ``max_train`` train regions and scored on the held-out slice of
    ``eval``. ``every``: steps between probes (0: only at the end; -1 or no facets: never)."""

    facets: Any = None
    every: int = 0
    max_train: int = 2048


@dataclass
class PretrainJob(RayTrainJob):
    """Everything a pre-training run needs; a YAML file under configs/pretrain/ gives these keys. ``model`` and
    ``model_overrides`` name the DynRefer model whose encoder is trained (its ``encoder.checkpoint``, if any, is
    the starting point)."""

    EXPORT_NAME: ClassVar[str] = "clip.safetensors"

    augment: AugmentSection = field(default_factory=AugmentSection)
    text: TextSection = field(default_factory=TextSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=0, max_regions=512, batch_size=128))
    name: str = "pretrain"

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.augment.larger <= 1.0:
            raise ValueError(f"augment.larger is a probability, got {self.augment.larger}")
        if self.augment.larger > 0 and not self.augment.candidate_ts:
            raise ValueError("augment.candidate_ts: give the t of the larger views (or set augment.larger: 0)")
        if not 0.0 <= self.text.full_caption <= 1.0:
            raise ValueError(f"text.full_caption is a probability, got {self.text.full_caption}")
        facets = self.text.resolved()
        if facets is not None and self.text.weights is not None and (
                len(self.text.weights) != len(facets.subsets()) or min(self.text.weights) < 0
                or sum(self.text.weights) <= 0):
            raise ValueError(f"text.weights: one non-negative weight per set of facets ({len(facets.subsets())}: "
                             f"{facets.subsets()}), got {self.text.weights}")
        if self.probe.facets is not None:
            from dynrefer.probe import parse_facets

            parse_facets(self.probe.facets)
            if self.probe.max_train < 2:
                raise ValueError(f"probe.max_train: at least 2 regions to fit on, got {self.probe.max_train}")
        if self.export and not self.export.endswith(CHECKPOINT_SUFFIXES):
            raise ValueError(f"export {self.export!r}: an open_clip checkpoint name ends with one of "
                             f"{CHECKPOINT_SUFFIXES}")


# --- the driver ---------------------------------------------------------------------------------------------------

def stage_settings(job: PretrainJob, size: int, prepared_size: int | None) -> tuple[StageSettings, StageSettings]:
    """The view stage for training (t=0 plus, with augmentation, one drawn larger view) and for held-out
    retrieval (the t=0 view alone)."""
    larger = job.augment.larger > 0
    views = ViewConfig(num_views=2 if larger else 1, candidate_ts=list(job.augment.candidate_ts) if larger else [])
    train = StageSettings(views=dataclasses.asdict(views), size=size, mode="train", seed=job.seed,
                          prepared_size=prepared_size, storage_options=job.storage_options or None)
    t0 = ViewConfig(num_views=1, candidate_ts=[], fixed_ts=[0.0])
    return train, dataclasses.replace(train, views=dataclasses.asdict(t0), mode="fixed")


def region_labels(job: PretrainJob, storage_options: storage.StorageOptions | None) -> dict[str, dict[str, str]]:
    """Each train and held-out region's answers to the probe's facets, by region id (from the rows' category and
    attributes)."""
    from dynrefer.probe import facet_labels, parse_facets

    facets = parse_facets(job.probe.facets)
    table = region_table(job.data.prepared, storage_options, ["region_id", "split", "category", "attributes"])
    splits = {job.data.train_split, job.data.val_split}
    return {str(r["region_id"]): facet_labels(r["category"], r["attributes"], facets)
            for r in table.to_pylist() if r["split"] in splits}


def run(job: PretrainJob) -> dict[str, Any]:
    """Pre-train on the connected Ray cluster; returns a summary (final metrics, checkpoint, exported CLIP)."""
    job.validate()
    job = job.absolute()
    so = job.storage_options or None
    cfg = resolved_model_config(job.model, job.model_overrides)
    splits, with_val = split_counts(job, region_table(job.data.prepared, so, ["split"]), "held-out retrieval")
    train, val = stage_settings(job, cfg.image_size, prepared_view_size(job.data.prepared, so))
    data = {"train": view_dataset(job.data, job.data.train_split, train, job.seed, so)}
    if with_val:
        data["val"] = view_dataset(job.data, job.data.val_split, val, job.seed, so, limit=job.eval.max_regions)
    probe_labels = None
    if with_val and job.probe.facets is not None and job.probe.every >= 0:
        data["probe"] = view_dataset(job.data, job.data.train_split, val, job.seed, so, limit=job.probe.max_train)
        probe_labels = region_labels(job, so)
    per_step = job.batch_size * job.grad_accum * job.workers.num
    train_regions = splits[job.data.train_split]
    log.info("%d train regions (%.1f epochs of %d steps of at most %d regions), encoder %s", train_regions,
             job.max_steps * per_step / train_regions, job.max_steps, per_step, cfg.encoder.name)
    config = {"job": dataclasses.asdict(job), "model": cfg.to_dict(), "with_val": with_val,
              "probe_labels": probe_labels}
    return fit(job, pretrain_loop, config, data, data_config(job.data))


# --- the workers --------------------------------------------------------------------------------------------------

def clip_arguments(batch: tuple[np.ndarray, list[str]], device: Any) -> tuple[Any, list[str]]:
    """The pre-trainer's forward arguments: crops (B, S, S, 3) uint8 on the device, and B captions."""
    import torch

    crops, captions = batch
    return torch.from_numpy(np.require(crops, requirements="W")).to(device), captions


def pretrainer_state(model: Any) -> dict[str, Any]:
    """The tensors a pre-training checkpoint keeps: the whole open_clip model."""
    return model.state_dict()


def distinct_batch(inputs: ModelInputs, larger: float, rng: np.random.Generator, texts: list[str] | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """One crop per region and its text (default: its caption), reduced to texts that are distinct across every
    rank's batch (equal sizes)."""
    import torch.distributed as dist

    from dynrefer.pretraining import distinct_captions, pick_crops

    texts = list(inputs.captions) if texts is None else texts
    per_rank: list[Any] = [texts]
    rank = 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, texts)
        rank = dist.get_rank()
    keep = distinct_captions(per_rank, rank)
    crops = pick_crops(inputs.region_views(), larger, rng)[keep]
    return crops, [texts[i] for i in keep]


def heldout_retrieval(model: Any, shard: Any, batch_size: int, device: Any) -> dict[str, float] | None:
    """Region -> caption retrieval over the whole val slice: each rank embeds its part, rank 0 scores them all."""
    import torch

    from dynrefer.pretraining import retrieval_scores

    images, texts, captions = [], [], []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        inputs = ModelInputs.from_columns(batch)
        crops = torch.from_numpy(np.require(inputs.region_views()[:, 0], requirements="W")).to(device)
        image, text = model.embed(crops, inputs.captions)
        images.append(image.cpu())
        texts.append(text.cpu())
        captions += inputs.captions
    parts = gather_on_rank0((torch.cat(images) if images else None, torch.cat(texts) if texts else None, captions))
    if parts is None:
        return None
    parts = [p for p in parts if p[2]]
    return retrieval_scores(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                            [c for p in parts for c in p[2]])


def gathered_embeddings(model: Any, shard: Any, batch_size: int, device: Any) -> tuple[np.ndarray, list[str]] | None:
    """The image embeddings (t=0 crops) and region ids of a whole dataset: each rank embeds its part, rank 0 gets
    them all (others None)."""
    import torch

    features, ids = [], []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        inputs = ModelInputs.from_columns(batch)
        crops = torch.from_numpy(np.require(inputs.region_views()[:, 0], requirements="W")).to(device)
        features.append(model.embed(crops, inputs.captions)[0].cpu().numpy())
        ids += inputs.region_ids
    parts = gather_on_rank0((np.concatenate(features) if features else None, ids))
    if parts is None:
        return None
    parts = [p for p in parts if p[1]]
    return np.concatenate([p[0] for p in parts]), [i for p in parts for i in p[1]]


def heldout_probe(model: Any, train_shard: Any, val_shard: Any, labels: dict[str, dict[str, str]], facets: list[str],
                  batch_size: int, device: Any) -> dict[str, float] | None:
    """Linear-probe accuracy per facet of the image embedding: fitted on the train slice, scored on the held-out
    one (rank 0; others None)."""
    from dynrefer.probe import probe_scores

    train = gathered_embeddings(model, train_shard, batch_size, device)
    val = gathered_embeddings(model, val_shard, batch_size, device)
    if train is None or val is None:
        return None
    return probe_scores(train[0], [labels.get(i, {}) for i in train[1]], val[0], [labels.get(i, {}) for i in val[1]],
                        facets)


def pretrain_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    import torch

    from dynrefer.config import DynReferConfig
    from dynrefer.pretraining import ContrastivePretrainer, save_clip, step_texts
    from dynrefer.probe import parse_facets

    worker = Worker.current()
    job = PretrainJob.from_dict(config["job"])
    cfg = DynReferConfig.from_dict(config["model"])
    so = job.storage_options or None
    rank, world, device = worker.rank, worker.world, worker.device
    state = worker.state("ddp")
    torch.manual_seed(job.seed)  # every rank builds the same initial weights
    model = ContrastivePretrainer(cfg.encoder, so, rank, world)
    stepper = DDPStepper(model, device, job, arguments=clip_arguments, state=pretrainer_state)
    worker.restore(stepper, state)
    rng = np.random.default_rng([job.seed, rank, state.step])  # which regions show a larger view
    writer = worker.writer(job.log_dir, state)
    val = worker.shard("val") if config["with_val"] else None
    labels = config.get("probe_labels")
    probe_train = worker.shard("probe") if labels is not None else None
    facets = list(parse_facets(job.probe.facets)) if labels is not None else []
    text_facets = job.text.resolved()
    last_probe = None if state.step == 0 else state.step  # a fresh run probes before training (probe.every > 0)

    def evaluate(step: int, final: bool) -> dict[str, float]:
        nonlocal last_probe
        probe = probe_train is not None and (final or (job.probe.every > 0 and (
            last_probe is None or step - last_probe >= job.probe.every)))
        last_probe = step if probe else last_probe
        scores = heldout_retrieval(stepper.module, val, job.eval.batch_size, device)
        accuracy = (heldout_probe(stepper.module, probe_train, val, labels, facets, job.eval.batch_size, device)
                    if probe else None)
        if scores is None:
            return {}
        if writer is not None:
            for key, value in scores.items():
                writer.add_scalar(f"val/{key}", value, step)
            for key, value in (accuracy or {}).items():
                writer.add_scalar(f"val/probe_{key}", value, step)
        log.info("step %d: held-out retrieval %s", step, {k: round(v, 4) for k, v in scores.items()})
        if accuracy is not None:
            log.info("step %d: held-out linear probe accuracy %s", step, {k: round(v, 4) for k, v in accuracy.items()})
        probe_metrics = {f"val_probe_{k}": v for k, v in (accuracy or {}).items()}
        return {**{f"val_{k}": v for k, v in scores.items()}, **probe_metrics}

    def micro_step(inputs: ModelInputs, step: int, micro: int) -> MicroStep:
        # The same generator state on every rank: all ranks write the same facets this step.
        texts = step_texts(inputs.captions, text_facets, job.text.full_caption,
                           np.random.default_rng([job.seed, 1, step, micro]), job.text.weights)
        crops, captions = distinct_batch(inputs, job.augment.larger, rng, texts)
        losses, stepped = stepper.train_step((crops, captions), device)
        return MicroStep(losses, stepped, len(captions) * world)

    batches: Iterator[ModelInputs] = iter(())
    if state.step < job.max_steps:
        batches = train_batches(worker.shard("train"), job, rank)
    hooks = LoopHooks(
        micro_step=micro_step, report=worker.report,
        checkpoint=worker.checkpointer(stepper, state, cfg, job.fault, writer),
        reduce=lambda mean: all_mean(mean, METRICS),
        step_metrics=lambda mean, samples, seconds: {**mean, "lr": stepper.lr(), "batch": samples,
                                                     "samples_per_s": samples / seconds},
        evaluate=evaluate if val is not None else None, on_step=scalar_logger(writer))
    run_loop(batches, state, Cadence(job.max_steps, job.log_every, job.checkpoint_every, job.eval.every), hooks,
             rank, evaluate_first=state.step == 0)
    if rank == 0:
        save_clip(stepper.module.clip, job.export_uri, so)
        log.info("open_clip checkpoint written to %s", job.export_uri)
    if writer is not None:
        writer.close()


# --- command line -------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML under configs/pretrain/")
    p.add_argument("--prepared", nargs="+", help="prepare-stage output directories (override data.prepared)")
    add_run_args(p, "where to write the open_clip checkpoint (.safetensors or .pt)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    job = PretrainJob.from_yaml(args.config, **run_overrides(args), **{"data.prepared": args.prepared})
    return launch(args, run, job)


if __name__ == "__main__":
    sys.exit(main())
