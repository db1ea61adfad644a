"""`dynrefer caption` against a single-process loop over ``dynrefer.load(...).caption`` on the same regions, and
what the CPU stage ships through Ray's object store per region.

A synthetic corpus is prepared at the model's input size and captioned by an exported tiny model (random
weights: the cost of a forward does not depend on them; captions run to ``max_new_tokens``):

* regions/s of the caption job on a local Ray cluster of ``--cpus`` CPUs (wall time of ``run``, Ray Data's start
  included), and of one process calling ``Predictor.caption`` image by image on the prepared boxes;
* bytes per region of the blocks the CPU stage (``ShardInputs``) hands the model stage, as Ray Data stores them
  (an Arrow block's size), measured in this process on every prepared shard.

    .venv/bin/python benchmarks/caption.py [--images 48] [--cpus 2] [--batch-size 32] [--views phash|fixed]

The loop's regions pay what the job's CPU stage does not: ``Predictor.caption`` cuts every candidate view of each
box and hashes it (the prepare stage's work, which the job reads back), and it runs beside nothing else.

Measured on 2 shared CPU cores, 32 images (267 regions), batch 32, pHASH views: before the caption stage shipped
each chunk's distinct views once (8552f9f), 37,029 bytes per region through the object store and 13.8 regions/s;
after, 37,737 bytes per region (this corpus's pHASH picks share no view: 438 distinct of 438 on one shard; with
``--views fixed`` 311 of 438, 29% fewer view bytes) and 11.0 regions/s (a 19 s vs 24 s run, mostly actor start);
the single-process loop 2.2 regions/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections import defaultdict
from typing import Any

import pyarrow.parquet as pq
import torch

import dynrefer
from dynrefer import synth
from dynrefer.checkpoint import save_pretrained
from dynrefer.config import load_config
from dynrefer.model import DynRefer
from dynrefer.preprocess import PrepareConfig
from pipelines.caption import run
from pipelines.caption_inputs import ShardInputs
from pipelines.caption_job import CaptionJob
from pipelines.prepare import PrepareJob
from pipelines.prepare import run as prepare


def setup(root: str, images: int, seed: int) -> tuple[str, str]:
    """A prepared synthetic corpus and a tiny export under ``root``: (prepared, model)."""
    cfg = load_config("tiny")
    synth.write_corpus(os.path.join(root, "synth"), images, seed=seed, progress=False)
    prepared, model = os.path.join(root, "prepared"), os.path.join(root, "model")
    prepare(PrepareJob(dataset="vg", root=os.path.join(root, "synth"), out=prepared, images_per_shard=16,
                       prepare=PrepareConfig(view_size=cfg.image_size, candidate_ts=list(cfg.views.candidate_ts))),
            progress=False)
    torch.manual_seed(seed)
    save_pretrained(DynRefer(cfg), model)
    return prepared, model


def object_store_bytes(job: CaptionJob, stage: type = ShardInputs) -> dict[str, Any]:
    """Bytes per region of the CPU stage's output blocks over every prepared shard (``stage`` called in-process)."""
    from ray.data.block import BlockAccessor

    spec = dataclasses.asdict(job)
    shards = sorted(int(n[6:11]) for n in os.listdir(os.path.join(job.prepared, "regions")))
    worker = stage(spec)
    total_bytes, totals = 0, {}
    for shard in shards:
        for batch in worker({"shard": [shard]}):
            total_bytes += BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).size_bytes()
            totals[shard] = int(batch["shard_total"][0])
    regions = sum(totals.values())
    return {"regions": regions, "bytes": total_bytes, "bytes_per_region": round(total_bytes / regions)}


def job_rate(job: CaptionJob) -> dict[str, Any]:
    start = time.perf_counter()
    summary = run(job, progress=False)
    seconds = time.perf_counter() - start
    return {"regions": summary["captioned"], "seconds": round(seconds, 2),
            "regions_per_second": round(summary["captioned"] / seconds, 1)}


def loop_rate(model: str, prepared: str) -> dict[str, Any]:
    """One process, image by image: ``dynrefer.load(model).caption(file, boxes)`` on the prepared boxes."""
    rows = pq.read_table(os.path.join(prepared, "regions"), columns=["file", "box"]).to_pylist()
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for r in rows:
        boxes[r["file"]].append(r["box"])
    predictor = dynrefer.load(model)
    start = time.perf_counter()
    regions = sum(len(predictor.caption(file, boxes=bs)) for file, bs in boxes.items())
    seconds = time.perf_counter() - start
    return {"regions": regions, "seconds": round(seconds, 2), "regions_per_second": round(regions / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--views", default="phash", choices=["phash", "fixed"],
                   help="view choice (fixed shares the t=1 view of an image's regions; pHASH picks may differ)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import ray

    from pipelines.args import secure_ray_env

    with tempfile.TemporaryDirectory() as root:
        secure_ray_env()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            prepared, model = setup(root, args.images, args.seed)
            job = CaptionJob(model=model, prepared=prepared, out=os.path.join(root, "captions"),
                             batch_size=args.batch_size, views=args.views, cpus_per_actor=1.0,
                             cpus_per_input_worker=1.0)
            result = {"images": args.images, "cpus": args.cpus, "batch_size": args.batch_size, "views": args.views,
                      "object_store": object_store_bytes(job), "caption_job": job_rate(job),
                      "single_process_loop": loop_rate(model, prepared)}
        finally:
            ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
