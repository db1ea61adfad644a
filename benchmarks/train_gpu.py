"""GPU training throughput and peak memory, side by side in one run: DDP vs DeepSpeed ZeRO-2, fp32 vs bf16.

One process, one GPU, no Ray: each variant builds the model of the training config (``base`` by default; every
weight randomly initialised, since speed does not depend on weight values and no weights are downloaded) and
runs the training's own DDPStepper or DeepSpeedStepper (``pipelines.steppers``) on the same few batches of the
synthetic corpus (rendered, prepared by the prepare stage's shard function and batched by ``dynrefer.batching``
before timing), so the numbers are model steps without data waits. samples/s counts the steps after
``--warmup``; peak memory is ``torch.cuda.max_memory_allocated`` over the variant.

    .venv/bin/python benchmarks/train_gpu.py [--config configs/train/base_gpu.yaml] [--steps 20] [--batch-size 64]
    .venv/bin/python benchmarks/train_gpu.py --device cpu --config configs/train/tiny.yaml --steps 2   # logic check
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import socket
import sys
import tempfile
import time
from typing import Any


from dynrefer.paths import REPO_ROOT as REPO  # noqa: E402
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))

from pipelines.train_job import TrainJob  # noqa: E402

VARIANTS = {"ddp-fp32": (True, "fp32"), "zero2-fp32": (False, "fp32"), "ddp-bf16": (True, "bf16"),
            "zero2-bf16": (False, "bf16")}


def synthetic_batches(job: TrainJob, views: Any, size: int, images: int, count: int, base: str) -> tuple[list, str]:
    """``count`` training batches of ``job.batch_size`` regions of the synthetic corpus (``size`` px views), and
    the prepared directory they come from."""
    import pyarrow.parquet as pq

    from dynrefer import datasets, synth
    from dynrefer.batching import build_inputs, load_images, region_rng
    from dynrefer.preprocess import PrepareConfig
    from pipelines.prepare import PrepareJob, prepare_shard, summarize

    root, out = os.path.join(base, "synth"), os.path.join(base, "prepared")
    synth.write_corpus(root, images, seed=0, progress=False)
    prepare = PrepareJob(dataset="vg", root=root, out=out, prepare=PrepareConfig(view_size=size))
    records = list(datasets.read_visual_genome(root))
    prepare_shard(0, records, prepare)
    summarize(prepare, 1, sum(len(r["regions"]) for r in records), 1.0)  # writes tags.json
    rows = pq.read_table(os.path.join(out, "regions")).to_pylist()
    need = job.batch_size * count
    if len(rows) < need:
        raise ValueError(f"{images} images give {len(rows)} regions, {need} needed: raise --images")
    pictures = load_images(r["file"] for r in rows[:need])
    batches = []
    for i in range(count):
        part = rows[i * job.batch_size:(i + 1) * job.batch_size]
        rngs = [region_rng(job.seed, 0, r["region_id"]) for r in part]
        batches.append(build_inputs(part, pictures, views, size, "train", rngs, prepared_size=size))
    return batches, out


def init_process_group(backend: str) -> None:
    """A one-process group, as Ray Train would set up for one worker."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend=backend)


def measure(job: TrainJob, cfg, batches: list, device, warmup: int, steps: int) -> dict[str, float]:
    """samples/s over ``steps`` optimizer steps after ``warmup`` ones, peak GPU memory, and the last loss."""
    import torch

    from pipelines.steppers import build_stepper, deepspeed_config
    from pipelines.train import build_model

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stepper = build_stepper(job, build_model(cfg, job.seed, None), None if job.ddp else deepspeed_config(job), device)
    loss = float("nan")
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        losses, _ = stepper.train_step(batches[i % len(batches)], device)
        loss = float(losses["loss"])  # a host sync every step, as the training loop's logging does
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if hasattr(stepper, "engine"):
        stepper.engine.destroy()
    del stepper
    gc.collect()
    return {"samples_per_s": job.batch_size * steps / seconds, "peak_gib": peak, "loss": loss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "train", "base_gpu.yaml"),
                    help="training YAML: its model, batch size, optimizer and schedule (weight paths are dropped)")
    ap.add_argument("--model", help="model config name or path instead of the training config's")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda (the benchmark) or cpu (a logic check with a small model; fp32 variants only)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all (fp32 only on cpu)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, help="regions per step (default: the config's)")
    ap.add_argument("--images", type=int, default=40, help="synthetic images to cut the batches from")
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_gpu.py: no CUDA device here. This benchmark measures GPU training; for a logic check run "
              "--device cpu --config configs/train/tiny.yaml --steps 2", file=sys.stderr)
        return 2
    variants = args.variants or [v for v in VARIANTS if args.device == "cuda" or VARIANTS[v][1] == "fp32"]
    if args.device == "cpu" and any(VARIANTS[v][1] == "bf16" for v in variants):
        print("train_gpu.py: bf16 needs --device cuda (RoI-Align and deformable conv have no bf16 CPU kernels)",
              file=sys.stderr)
        return 2
    job = TrainJob.from_yaml(args.config)
    job = dataclasses.replace(job, model=args.model or job.model, model_overrides={}, init_from=None,
                              batch_size=args.batch_size or job.batch_size, grad_accum=1,
                              max_steps=args.warmup + args.steps,
                              schedule=dataclasses.replace(job.schedule, warmup_steps=1))
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group("nccl" if device.type == "cuda" else "gloo")

    from pipelines.train import model_config
    from pipelines.train_data import region_table
    from pipelines.train_job import resolved_model_config

    with tempfile.TemporaryDirectory(prefix="dynrefer-bench-gpu-") as base:
        model = resolved_model_config(job.model, job.model_overrides)
        batches, prepared = synthetic_batches(job, model.views, model.image_size, args.images, 4, base)
        job = dataclasses.replace(job, data=dataclasses.replace(job.data, prepared=[prepared]))
        cfg = model_config(job, region_table([prepared], None, ["caption", "category", "attributes"]))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print(f"model {job.model} ({cfg.image_size} px, {cfg.views.num_views} views), batch {job.batch_size}, "
              f"{args.steps} timed steps after {args.warmup}, {name}", flush=True)
        results = {}
        for variant in variants:
            ddp, precision = VARIANTS[variant]
            run_job = dataclasses.replace(job, ddp=ddp, precision=precision,
                                          deepspeed=os.path.join(REPO, "configs", "deepspeed", "zero2.json"))
            results[variant] = measure(run_job, cfg, batches, device, args.warmup, args.steps)
            r = results[variant]
            peak = f"{r['peak_gib']:7.2f} GiB" if device.type == "cuda" else "    n/a    "
            print(f"{variant:<12} {r['samples_per_s']:9.1f} samples/s   peak {peak}   loss {r['loss']:.3f}", flush=True)
    pairs = [(f"ZeRO-2 / DDP ({p})", f"zero2-{p}", f"ddp-{p}") for p in ("fp32", "bf16")]
    pairs += [(f"bf16 / fp32 ({e})", f"{e}-bf16", f"{e}-fp32") for e in ("ddp", "zero2")]
    for label, a, b in pairs:
        if a in results and b in results:
            ratio = f"{label}: {results[a]['samples_per_s'] / results[b]['samples_per_s']:.2f}x samples/s"
            if device.type == "cuda":
                ratio += f", {results[a]['peak_gib'] / results[b]['peak_gib']:.2f}x peak memory"
            print(ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
