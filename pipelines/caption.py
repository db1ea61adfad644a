"""Bulk region captioning with Ray Data: given boxes or dense captioning, a model actor pool predicts.

Two inputs. (a) The prepare stage's output (one row per region, with view boxes and pHASH codes): a CPU actor per
prepared shard decodes its images and builds model inputs. (b) Images alone (dense captioning): a Visual Genome
root, a COCO images file, a list file or a directory of images (:mod:`dynrefer.image_lists`), cut into shards of
images; the boxes come from a class-agnostic proposal model (an actor pool, GPU actors when asked) or from a
detector's COCO-format detections file (:mod:`dynrefer.detections`); then the prepare stage's own per-image code
(:mod:`dynrefer.preprocess`) turns every image and its boxes into region rows. Either way the CPU stage
(:mod:`pipelines.caption_inputs`) ships each chunk of regions with every distinct view once, and an actor pool
over :func:`dynrefer.load`'s Predictor (:mod:`pipelines.batch_predictor`) predicts captions, tags, category and
attributes; the driver writes ``captions/shard-NNNNN.{parquet,jsonl}`` (:mod:`dynrefer.caption_files`) once
every row of a shard is back, so a killed job, rerun, finishes the missing shards and every region comes out
exactly once (as a row or an error row).

Error rows carry the message in ``error`` and a short code in ``reason``, the codes the prepare stage writes:
``missing`` (no such file), ``read_error``, the decoder's ``empty``, ``not_image``, ``corrupt``, ``truncated``,
``too_large`` and ``unsupported_mode``, ``bad_box``, ``bad_record`` (a malformed annotation entry) and
``bad_detection`` (a malformed entry of a detections file).

    dynrefer caption --config configs/caption/synthetic.yaml [--model EXPORT] [--out OUT] [--split test] ...
    dynrefer caption --model EXPORT --prepared PREPARED --out OUT [--split test] [--views phash|fixed]
    dynrefer caption --model EXPORT --images VG_ROOT|DIR|LIST.txt|COCO.json --proposals PROPOSER --out OUT
    dynrefer caption --model EXPORT --images ... --detections DETECTIONS.json --out OUT [--min-score 0.3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dynrefer import storage
from dynrefer.caption_files import FORMATS, encode_rows, read_caption_rows
from pipelines.args import add_ray_args, add_storage_args, init_ray, setup_logging, storage_options_from_args
from pipelines.batch_predictor import CaptionModel
from pipelines.caption_inputs import ShardInputs
from pipelines.caption_job import CaptionJob, check_manifest, output_name, plan, plan_uri, validate_job
from pipelines.caption_proposals import ProposeRegions

log = logging.getLogger("dynrefer.caption")

#: Command-line flags that set a job key (the rest steer the command itself).
JOB_FLAGS = tuple(f.name for f in dataclasses.fields(CaptionJob) if f.name != "storage_options")
#: Keys that exclude each other: the one the command line gives wins over the job file's other.
EXCLUSIVE = (("prepared", "images"), ("images", "prepared"), ("proposals", "detections"),
             ("detections", "proposals"))


def run(job: CaptionJob, progress: bool = True) -> dict[str, Any]:
    """Caption every region (given or proposed) not captioned yet; returns (and writes) the summary."""
    import ray
    from tqdm import tqdm

    validate_job(job)
    so = job.storage_options or None
    start = time.perf_counter()
    done = set(storage.listdir(storage.join(job.out, "captions"), so))
    images, items = plan(job, done, ready=lambda: check_manifest(job))
    todo = [it for it in items if output_name(it["shard"], job.format) not in done]
    log.info("%d shards; %d already captioned, %d to do", len(items), len(items) - len(todo), len(todo))
    if todo:
        spec = dataclasses.asdict(job)
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        if job.proposals is not None:
            ds = ds.map_batches(ProposeRegions, fn_constructor_kwargs={"job": spec}, batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=job.proposers),
                                num_cpus=job.cpus_per_proposer,
                                num_gpus=job.gpus_per_proposer)
        ds = ds.map_batches(ShardInputs, fn_constructor_kwargs={"job": spec}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=job.input_workers),
                            num_cpus=job.cpus_per_input_worker)
        ds = ds.map_batches(CaptionModel, fn_constructor_kwargs={"job": spec}, batch_size=1,  # a chunk a call
                            compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=job.cpus_per_actor,
                            num_gpus=job.gpus_per_actor, **({"resources": dict(job.actor_resources)}
                                                            if job.actor_resources else {}))
        pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
        with tqdm(unit="region", desc="caption", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for shard, total, row in zip(batch["shard"].tolist(), batch["shard_total"].tolist(), batch["row"]):
                    pending[shard].append(json.loads(row))
                    if len(pending[shard]) == total:
                        rows = sorted((r for r in pending.pop(shard) if r["region_id"] is not None or r["error"]),
                                      key=lambda r: (r["image_id"] or "", r["region_id"] or ""))
                        storage.write_bytes(storage.join(job.out, "captions", output_name(shard, job.format)),
                                            encode_rows(rows, job.format), so)
                        if job.dense:  # written: the shard's plan is no longer needed
                            storage.remove(plan_uri(job, shard), so)
                bar.update(len(batch["row"]))
        if pending:
            raise RuntimeError(f"shards {sorted(pending)} did not come back whole")
    summary = summarize(job, len(items), images, len(todo), time.perf_counter() - start)
    storage.write_json(storage.join(job.out, "summary.json"), summary, so)
    return summary


def summarize(job: CaptionJob, shards: int, images: int, written_now: int, seconds: float) -> dict[str, Any]:
    """Counts over every output shard on disk: given regions are checked against the prepared rows of the split,
    dense ones for every shard being there, each region once and each image in one shard only."""
    so = job.storage_options or None
    out_rows = read_captions(job.out, job.format, so)
    ids = [r["region_id"] for r in out_rows if r["region_id"] is not None]
    errors = sum(1 for r in out_rows if r.get("error"))
    summary: dict[str, Any] = {"captioned": len(out_rows) - errors, "errors": errors}
    if job.dense:
        names = set(storage.listdir(storage.join(job.out, "captions"), so))
        missing = [s for s in range(shards) if output_name(s, job.format) not in names]
        with_regions = {r["image_id"] for r in out_rows if not r.get("error")}
        summary.update(images=images, shards=shards, shards_missing=len(missing),
                       images_with_regions=len(with_regions), images_without_regions=images - len(with_regions)
                       if not missing else None,
                       exactly_once=not missing and len(ids) == len(set(ids)))
    else:
        fs, path = storage.filesystem(storage.join(job.prepared, "regions"), so)
        prepared = pq.read_table(path, filesystem=fs, columns=["region_id", "split"])
        if job.split is not None:
            prepared = prepared.filter(pa.compute.equal(prepared["split"], job.split))
        summary.update(prepared_regions=prepared.num_rows,
                       exactly_once=sorted(ids) == sorted(prepared["region_id"].to_pylist()))
    summary.update(shards_written_now=written_now, seconds=round(seconds, 2),
                   regions_per_second=round(len(out_rows) / seconds, 1) if seconds and written_now else None)
    return summary


def read_captions(out: str, fmt: str = "parquet", storage_options: storage.StorageOptions | None = None
                  ) -> list[dict[str, Any]]:
    """Every caption row written under ``out`` (score maps as dicts); ``fmt`` is kept for callers that name it,
    the reader tells the formats apart by name."""
    captions = storage.join(out, "captions")
    written = [n for n in storage.listdir(captions, storage_options) if n.endswith(tuple(FORMATS.values()))]
    return read_caption_rows(captions, storage_options) if written else []


def parser() -> argparse.ArgumentParser:
    """Every flag but --config overrides the job file; without one, the defaults are CaptionJob's."""
    d = CaptionJob()
    p = argparse.ArgumentParser(prog="dynrefer caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="job file under configs/caption/ (every flag below overrides it)")
    p.add_argument("--model", help="exported model directory (local or s3://)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prepared", help="regions with boxes: the prepare stage's output directory")
    source.add_argument("--images", help="dense captioning: a Visual Genome root, a COCO JSON with 'images', a .txt "
                                         "list of image URIs, or a directory of images")
    boxes = p.add_mutually_exclusive_group()
    boxes.add_argument("--proposals", help="dense: exported proposal model directory")
    boxes.add_argument("--detections", help="dense: COCO-format detections JSON [{image_id, bbox: [x, y, w, h], "
                                            "score, category_id?}]; image_id as --images names them")
    p.add_argument("--image-root", help="with a COCO JSON as --images: folder of its file_names (default: its own)")
    p.add_argument("--min-score", type=float, help=f"dense: drop proposals/detections scoring less ({d.min_score})")
    p.add_argument("--max-regions", type=int, help=f"dense: at most this many regions per image ({d.max_regions})")
    p.add_argument("--images-per-shard", type=int, help=f"dense: images per output shard ({d.images_per_shard})")
    p.add_argument("--out", help="output directory or s3:// prefix")
    p.add_argument("--split", help="only regions (or, with a VG root, images) of this split")
    p.add_argument("--views", choices=["phash", "fixed"], help=f"view choice at inference ({d.views})")
    p.add_argument("--batch-size", type=int, help=f"regions per forward ({d.batch_size})")
    p.add_argument("--actors", type=int, help=f"model replicas ({d.actors})")
    p.add_argument("--gpus-per-actor", type=float, help=f"({d.gpus_per_actor})")
    p.add_argument("--cpus-per-actor", type=float, help=f"Ray CPUs each model replica reserves ({d.cpus_per_actor})")
    p.add_argument("--actor-resources", type=json.loads, metavar="JSON",
                   help='custom Ray resources each model replica needs, e.g. \'{"a100": 1}\' to pin the replicas '
                        'to nodes started with `ray start --resources`')
    p.add_argument("--input-workers", type=int,
                   help=f"CPU actors decoding images and cutting views (keep the model replicas fed; "
                        f"{d.input_workers})")
    p.add_argument("--cpus-per-input-worker", type=float, help=f"({d.cpus_per_input_worker})")
    p.add_argument("--proposers", type=int, help=f"proposal model replicas ({d.proposers})")
    p.add_argument("--gpus-per-proposer", type=float, help=f"({d.gpus_per_proposer})")
    p.add_argument("--cpus-per-proposer", type=float, help=f"({d.cpus_per_proposer})")
    p.add_argument("--format", choices=["parquet", "jsonl"], help=f"({d.format})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_args(p)
    add_storage_args(p)
    return p


def job_from_args(args: argparse.Namespace) -> CaptionJob:
    """The job file (if any) with the command line's flags over it; a ValueError says what is wrong."""
    overrides = {k: v for k, v in vars(args).items() if k in JOB_FLAGS}
    job = CaptionJob.from_yaml(args.config, **overrides, storage_options=storage_options_from_args(args) or None)
    for given, other in EXCLUSIVE:  # an input or box source on the command line replaces the file's
        if overrides.get(given) is not None:
            setattr(job, other, None)
    validate_job(job)
    return job


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    try:
        job = job_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    init_ray(args)
    try:
        summary = run(job, progress=not args.quiet)
    except ValueError as e:  # unusable inputs found while planning (a malformed listing, another job's out)
        log.error("%s", e)
        return 2
    print(json.dumps(summary, indent=2))
    return 0 if summary["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
