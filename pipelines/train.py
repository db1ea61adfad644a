"""Ray Train: DynRefer trained with DeepSpeed (or plain DDP) on the prepare stage's Parquet shards.

The driver reads the prepared data's tag vocabulary (and, for a word-level LM, its caption words) into the
model config, and builds two Ray Datasets: the train split, whose map stage decodes each image once and crops
freshly drawn views for every region each epoch, and a held-out slice of the val split with the inference-time
(pHASH) views. A ``TorchTrainer`` streams them to the workers, which train with ``deepspeed.initialize``
(gloo on CPU, NCCL on GPU, the same code), report per-step metrics, write TensorBoard logs (rank 0), score
the val slice with CIDEr every ``eval.every`` steps, save checkpoints every rank contributes to, and export
the model with ``dynrefer.checkpoint.save_pretrained`` at the end. Rerunning with the same storage path and
name resumes from the latest checkpoint, as does Ray Train after a worker dies (``max_failures``).

This module is the program (driver, worker loop, command line); its parts are shared with pre-training:
the job file (``pipelines.train_job``), the data (``pipelines.train_data``), the engines (``pipelines.steppers``),
the step loop (``pipelines.training_loop``) and Ray Train's side of it (``pipelines.ray_training``).

    python -m pipelines.train --config configs/train/tiny.yaml [--ddp] [--address auto] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import sys
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from dynrefer import storage
from dynrefer.batching import ModelInputs
from dynrefer.config import DynReferConfig
from pipelines.args import add_run_args, launch, run_overrides
from pipelines.ray_training import Worker, all_mean, fit, gather_on_rank0, scalar_logger
from pipelines.steppers import build_stepper, deepspeed_config, default_extensions_dir, tensors
from pipelines.train_data import (caption_words, data_config, datasets, label_names, prepared_view_size, region_table,
                                  split_counts, tag_vocabulary, train_batches)
from pipelines.train_job import TrainJob, resolved_model_config
from pipelines.training_loop import Cadence, LoopHooks, MicroStep, run_loop

log = logging.getLogger("dynrefer.train")

LOSSES = ("loss", "caption", "tags", "contrastive", "itc")


# --- the driver ---------------------------------------------------------------------------------------------------

def model_config(job: TrainJob, train_rows: pa.Table) -> DynReferConfig:
    """The model config with the data written in: the tag vocabulary, the train captions' words for a word-level
    LM, and the categories and attributes to recognise (unless the config lists its own)."""
    so = job.storage_options or None
    if job.init_from:  # fine-tuning keeps the export's vocabularies and labels, so its weights fit
        config_uri = storage.join(job.init_from, "config.json")
        if not storage.exists(config_uri, so):
            raise ValueError(f"init_from {job.init_from}: no export there (no config.json); train the run it names "
                             "first (configs/train/tiny.yaml starts from configs/train/tiny_qformer.yaml's), or set "
                             "init_from: null to start from scratch")
        base = storage.read_json(config_uri, so)
        return resolved_model_config(job.model, job.model_overrides, base)
    cfg = resolved_model_config(job.model, job.model_overrides)
    cfg.tags.vocabulary = tag_vocabulary(job.data.prepared, so, job.data.max_tags)
    if job.data.lm_vocabulary == "captions" and not cfg.language.path:
        cfg.language.vocabulary = caption_words(train_rows["caption"].to_pylist())
    if not cfg.recognition.categories:
        cfg.recognition.categories = label_names(train_rows["category"])
    if not cfg.recognition.attributes:
        cfg.recognition.attributes = label_names(train_rows["attributes"])
    w = cfg.loss
    if not (w.caption > 0 or w.contrastive > 0 or w.itc > 0 or (w.tags > 0 and cfg.tags.vocabulary)):
        raise ValueError("every loss is off (loss weights are 0, or tags have an empty vocabulary)")
    return cfg


def run(job: TrainJob, train_fn: Any = None) -> dict[str, Any]:
    """Train on the connected Ray cluster; returns a summary (final metrics, checkpoint, export).

    ``train_fn`` replaces the per-worker loop (default :func:`train_loop`) with the same datasets and configs.
    """
    job.validate()
    job = job.absolute()
    so = job.storage_options or None
    table = region_table(job.data.prepared, so, ["split", "caption", "category", "attributes"])
    splits, with_val = split_counts(job, table, "validation")
    cfg = model_config(job, table.filter(pc.equal(table["split"], job.data.train_split)))
    prepared_size = prepared_view_size(job.data.prepared, so)
    per_step = job.batch_size * job.grad_accum * job.workers.num
    log.info("%d train regions (%.1f epochs of %d steps), %d tags, %d LM words, %s", splits[job.data.train_split],
             job.max_steps * per_step / splits[job.data.train_split], job.max_steps, len(cfg.tags.vocabulary),
             len(cfg.language.vocabulary or []), "DDP" if job.ddp else job.deepspeed)
    config = {"job": dataclasses.asdict(job), "model": cfg.to_dict(), "with_val": with_val,
              "deepspeed": None if job.ddp else deepspeed_config(job)}
    return fit(job, train_fn or train_loop, config, datasets(job, cfg, prepared_size, with_val),
               data_config(job.data))


# --- the workers --------------------------------------------------------------------------------------------------

def build_model(cfg: DynReferConfig, seed: int, storage_options: storage.StorageOptions | None,
                init_from: str | None = None) -> Any:
    """The model, seeded so that every rank builds the same initial weights, or started from an export (a
    stage-1 export's ITC projection stays behind when this model has no ITC loss)."""
    import torch
    from safetensors.torch import load as load_safetensors

    from dynrefer.checkpoint import WEIGHTS_FILE, saved_state
    from dynrefer.model import DynRefer

    torch.manual_seed(seed)
    model = DynRefer(cfg, storage_options)
    if init_from:
        state = load_safetensors(storage.read_bytes(storage.join(init_from, WEIGHTS_FILE), storage_options))
        if model.itc is None:
            state = {k: v for k, v in state.items() if not k.startswith("itc.")}
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


def val_pass(stepper: Any, shard: Any, batch_size: int, device: Any,
             per_batch: Callable[[Any, dict[str, Any], ModelInputs, Any], Any]) -> list[Any] | None:
    """``per_batch(module, batch, inputs, tensors)`` over this rank's part of the val slice in eval mode, every rank's
    results gathered on rank 0 (None elsewhere)."""
    module = stepper.module
    results = []
    with stepper.gathered():
        module.eval()
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            inputs = ModelInputs.from_columns(batch)
            results.append(per_batch(module, batch, inputs, tensors(inputs, device)))
        module.train()
    parts = gather_on_rank0(results)
    return None if parts is None else [r for part in parts for r in part]


def tag_scores(module: Any, batch: dict[str, Any], inputs: ModelInputs, x: Any) -> tuple[Any, Any]:
    """A val batch's tag probabilities and 0/1 targets, (B, K) each, on CPU."""
    import torch

    with torch.no_grad():
        probs = torch.sigmoid(module.tags(module.embedding(*x)).float()).cpu()
    return probs, module.tags.targets(inputs.tags).cpu()


def evaluate(stepper: Any, shard: Any, batch_size: int, device: Any, with_tags: bool = False
             ) -> tuple[float, list[tuple[str, str, str]], list[tuple[Any, Any]] | None]:
    """Captions for the val slice, CIDEr (times 100) of the whole on rank 0 (nan elsewhere); with ``with_tags``
    also every batch's :func:`tag_scores` from the same pass (on rank 0; None elsewhere or without)."""
    from dynrefer.metrics import caption_scores

    def captions(module: Any, batch: dict[str, Any], inputs: ModelInputs, x: Any) -> tuple[list, Any]:
        said = [(rid, pred.caption, [str(r) for r in refs])
                for rid, pred, refs in zip(inputs.region_ids, module.predict(*x), batch["references"])]
        return said, tag_scores(module, batch, inputs, x) if with_tags else None

    rows = val_pass(stepper, shard, batch_size, device, captions)
    if rows is None:
        return float("nan"), [], None
    predictions = {rid: caption for part, _ in rows for rid, caption, _ in part}
    references = {rid: refs for part, _ in rows for rid, _, refs in part}
    examples = [(i, predictions[i], references[i][0]) for i in sorted(predictions)[:3]]
    cider = 100.0 * caption_scores(predictions, references, with_meteor=False)["cider"]
    return cider, examples, [tags for _, tags in rows] if with_tags else None


def tag_head_trained(cfg: DynReferConfig) -> bool:
    """Whether the tag head learned anything (its loss on, a vocabulary): only then is its threshold calibrated."""
    return cfg.loss.tags > 0 and bool(cfg.tags.vocabulary)


def calibrate_tags(module: Any, rows: list[tuple[Any, Any]] | None, min_precision: float) -> dict[str, float]:
    """Set the model's tag threshold from the val slice's :func:`tag_scores` rows (rank 0's gathered list; None
    elsewhere) by :func:`dynrefer.decoders.calibrated_threshold`, before the export is written; returns what was
    chosen (empty elsewhere, or when no threshold keeps a tag)."""
    import torch

    from dynrefer.decoders import calibrated_threshold

    if not rows:
        return {}
    chosen = calibrated_threshold(torch.cat([p for p, _ in rows]), torch.cat([t for _, t in rows]), min_precision)
    if chosen is None:
        log.warning("tag threshold kept at %.2f: no threshold keeps a tag on the val slice", module.cfg.tags.threshold)
        return {}
    threshold, precision, recall = chosen
    log.info("tag threshold %.2f (was %.2f): val tag precision %.1f%%, recall %.1f%%", threshold,
             module.cfg.tags.threshold, 100 * precision, 100 * recall)
    module.cfg.tags.threshold = threshold
    return {"tag_threshold": threshold, "val_tag_precision": precision, "val_tag_recall": recall}


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    from concurrent.futures import ThreadPoolExecutor
    from itertools import chain

    worker = Worker.current()
    job = TrainJob.from_dict(config["job"])
    cfg = DynReferConfig.from_dict(config["model"])
    so = job.storage_options or None
    state = worker.state("ddp" if job.ddp else "deepspeed")
    # The data pipeline starts while the model is built: the first batch is fetched in a thread.
    batches: Iterator[ModelInputs] = iter(())
    prefetch = ThreadPoolExecutor(1)
    first = prefetch.submit(lambda: None)
    if state.step < job.max_steps:
        batches = train_batches(worker.shard("train"), job, worker.rank)
        first = prefetch.submit(next, batches)

    import torch

    from dynrefer.checkpoint import save_pretrained

    device = worker.device
    stepper = build_stepper(job, build_model(cfg, job.seed, so, job.init_from), config["deepspeed"], device)
    worker.restore(stepper, state)
    random.seed(job.seed * 7919 + worker.rank * 104_729 + state.step)  # control-word dropping
    torch.manual_seed(job.seed * 7919 + worker.rank * 104_729 + state.step + 1)  # dropout
    writer = worker.writer(job.log_dir, state)
    val = worker.shard("val") if config["with_val"] else None
    micro_samples = job.batch_size * worker.world

    def micro_step(inputs: ModelInputs, step: int, micro: int) -> MicroStep:
        losses, stepped = stepper.train_step(inputs, device)
        return MicroStep(losses, stepped, micro_samples)

    # The export's tag threshold comes from the final val pass's tag scores (the same pass as its CIDEr).
    calibrating = val is not None and job.eval.tag_precision is not None and tag_head_trained(cfg)
    final_tags: dict[str, Any] = {}

    def val_cider(step: int, final: bool) -> dict[str, Any]:
        score, examples, tags = evaluate(stepper, val, job.eval.batch_size, device, with_tags=calibrating and final)
        if calibrating and final:
            final_tags["rows"] = tags  # set on every rank (None off rank 0), so all take the same path below
        if writer is not None:
            writer.add_scalar("val/cider", score, step)
            writer.add_text("val/examples", "\n\n".join(f"{i}: {p} (ref: {r})" for i, p, r in examples), step)
            log.info("step %d: val CIDEr %.2f", step, score)
        return {"val_cider": score}

    hooks = LoopHooks(
        micro_step=micro_step, report=worker.report,
        checkpoint=worker.checkpointer(stepper, state, cfg, job.fault, writer),
        reduce=lambda mean: all_mean(mean, LOSSES),
        step_metrics=lambda mean, samples, seconds: {**mean, "lr": stepper.lr(), "samples_per_s": samples / seconds},
        evaluate=val_cider if val is not None else None, on_step=scalar_logger(writer))
    head = first.result()
    prefetch.shutdown()
    run_loop(chain([head] if head is not None else [], batches), state,
             Cadence(job.max_steps, job.log_every, job.checkpoint_every, job.eval.every, "throughput"), hooks,
             worker.rank)
    if calibrating:  # a rerun of a finished run has no final pass: score the slice once for the threshold
        rows = final_tags["rows"] if "rows" in final_tags else val_pass(stepper, val, job.eval.batch_size, device,
                                                                        tag_scores)
        calibrate_tags(stepper.module, rows, job.eval.tag_precision)
    with stepper.gathered():
        if worker.rank == 0:
            save_pretrained(stepper.module, job.export_uri, so)
    if writer is not None:
        writer.close()


# --- command line -------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML under configs/train/")
    p.add_argument("--prepared", nargs="+", help="prepare-stage output directories (override data.prepared)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON under configs/deepspeed/")
    p.add_argument("--ddp", action="store_true", help="plain torch DDP instead of DeepSpeed")
    p.add_argument("--encoder-checkpoint", help="open_clip checkpoint of the frozen encoder (overrides the config's)")
    p.add_argument("--init-from", help="an export (local or s3://) whose config and weights start the run "
                                       "(overrides the config's init_from)")
    add_run_args(p, "where to write the exported model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    job = TrainJob.from_yaml(args.config, **run_overrides(args), **{
        "data.prepared": args.prepared, "deepspeed": args.deepspeed, "ddp": True if args.ddp else None,
        "init_from": args.init_from,
        "model_overrides.encoder.checkpoint": args.encoder_checkpoint})
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    return launch(args, run, job)


if __name__ == "__main__":
    sys.exit(main())
