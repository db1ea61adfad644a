"""Ray Data stage: decode every image once, compute each region's candidate views and pHASH codes, write Parquet.

The corpus is cut into shards of ``images_per_shard`` images as the annotations are streamed; each shard still to
do is written to ``plan/shard-NNNNN.json.gz`` and is one Ray Data row (its URI) processed by a CPU actor, which
writes ``regions/shard-NNNNN.parquet`` and ``errors/shard-NNNNN.parquet`` atomically and removes the plan. The
driver holds one shard at a time, whatever the corpus's size. A rerun after a kill skips the shards already
written. Bad input becomes error rows; input regions = rows + error rows.

    python -m pipelines.prepare --config configs/prepare/synthetic.yaml [--root ...] [--out ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynrefer import datasets, storage
from dynrefer.config import _build
from dynrefer.preprocess import PrepareConfig, error_row, preprocess_image
from dynrefer.tags import TagVocabulary
from pipelines.args import (add_ray_args, add_storage_args, init_ray, read_job_file, setup_logging,
                            storage_options_from_args)

log = logging.getLogger("dynrefer.prepare")

REGION_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("region_id", pa.string()), ("file", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("split", pa.string()),
    ("box", pa.list_(pa.float64(), 4)), ("caption", pa.string()), ("captions", pa.list_(pa.string())),
    ("tags", pa.list_(pa.string())), ("category", pa.string()), ("attributes", pa.list_(pa.string())),
    ("attribute_labels", pa.list_(pa.int8())),
    ("ts", pa.list_(pa.float64())), ("view_boxes", pa.list_(pa.list_(pa.int64(), 4))),
    ("rois", pa.list_(pa.list_(pa.float64(), 4))), ("phash", pa.list_(pa.uint64())),
])
VIEWS_FIELD = pa.field("views", pa.binary())
ERROR_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("region_id", pa.string()), ("file", pa.string()),
    ("stage", pa.string()), ("reason", pa.string()), ("message", pa.string()),
])


@dataclass
class PrepareJob:
    """What to prepare and where; a YAML file under configs/prepare/ gives these keys."""

    dataset: str = "vg"  # vg | refcocog | coco | ovad
    root: str = ""  # dataset directory (local or s3://)
    annotations: str | None = None  # coco/ovad: the instances JSON (default: under root)
    split: str | None = None
    out: str = ""
    images_per_shard: int = 64
    workers: int | None = None  # concurrent CPU tasks (default: every CPU of the cluster)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> "PrepareJob":
        return _build(cls, read_job_file(path, overrides), path)


def read_records(job: PrepareJob) -> Iterator[dict[str, Any]]:
    """The dataset's image records, whichever reader its format needs."""
    so = job.storage_options or None
    if job.dataset == "vg":
        return datasets.read_visual_genome(job.root, split=job.split, storage_options=so, record_errors=True)
    if job.dataset == "refcocog":
        return datasets.read_refcocog(job.root, split=job.split, storage_options=so)
    if job.dataset == "coco":
        ann = job.annotations or storage.join(job.root, "annotations", "instances.json")
        return datasets.read_coco_instances(ann, job.root, split=job.split, storage_options=so)
    if job.dataset == "ovad":
        ann = job.annotations or storage.join(job.root, "ovad.json")
        return datasets.read_ovad(ann, job.root, storage_options=so)
    raise ValueError(f"dataset must be one of vg, refcocog, coco, ovad; got {job.dataset!r}")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def table_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    return buf.getvalue()


def read_image_bytes(uri: str, storage_options: storage.StorageOptions | None) -> bytes | None:
    try:
        return storage.read_bytes(uri, storage_options)
    except FileNotFoundError:
        return None


def prepare_shard(shard: int, records: list[dict[str, Any]], job: PrepareJob) -> dict[str, Any]:
    """Process one shard and write its two files (errors first, so a regions file marks a finished shard)."""
    start = time.perf_counter()
    so = job.storage_options or None
    rows, errors = [], []
    for record in records:
        if "error" in record:
            errors.extend(preprocess_image(record, None, job.prepare)[1])
            continue
        try:
            data = read_image_bytes(record["file"], so)
        except OSError as e:
            errors.extend(error_row(record, r, "read", "read_error", str(e)) for r in record.get("regions") or [None])
            continue
        r, e = preprocess_image(record, data, job.prepare)
        rows.extend(r)
        errors.extend(e)
    schema = REGION_SCHEMA.append(VIEWS_FIELD) if job.prepare.store_views else REGION_SCHEMA
    storage.write_bytes(storage.join(job.out, "errors", shard_name(shard)), table_bytes(errors, ERROR_SCHEMA), so)
    storage.write_bytes(storage.join(job.out, "regions", shard_name(shard)), table_bytes(rows, schema), so)
    return {
        "shard": shard, "images": len(records), "input_regions": sum(len(r.get("regions") or []) for r in records),
        "regions": len(rows), "region_errors": sum(e["region_id"] is not None for e in errors),
        "image_errors": sum(e["region_id"] is None for e in errors), "seconds": time.perf_counter() - start,
    }


class PrepareShards:
    """Ray Data stage: a thin callable around :func:`prepare_shard`, one shard per batch row.

    A row carries the shard's plan file (a URI), not its records: the driver never holds more than one shard.
    """

    def __init__(self, job: dict[str, Any]):
        self.job = _build(PrepareJob, job, "job")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        so = self.job.storage_options or None
        results = []
        for shard, plan in zip(batch["shard"], batch["plan"]):
            results.append(prepare_shard(int(shard), read_plan(str(plan), so), self.job))
        return {k: np.array([r[k] for r in results]) for k in results[0]}


@dataclass
class Plan:
    """What planning found: the shard count, images and regions of the whole input, and the shards to do."""

    shards: int = 0
    images: int = 0
    input_regions: int = 0
    todo: list[int] = field(default_factory=list)


def iter_shards(job: PrepareJob) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(index, records) per shard in reading order, one shard in memory at a time; the same inputs give the same
    shards on every run."""
    shard: list[dict[str, Any]] = []
    index = 0
    for record in read_records(job):
        shard.append(record)
        if len(shard) == job.images_per_shard:
            yield index, shard
            index, shard = index + 1, []
    if shard:
        yield index, shard


def plan_uri(job: PrepareJob, index: int) -> str:
    return storage.join(job.out, "plan", shard_name(index).replace(".parquet", ".json.gz"))


def remove_plan(job: PrepareJob, index: int) -> None:
    """The shard is written: its plan is no longer needed (a rerun skips the shard). The driver removes it, not
    the worker: a killed run's worker can outlive its driver and must not remove the plan its rerun just wrote."""
    storage.remove(plan_uri(job, index), job.storage_options or None)


def read_plan(uri: str, storage_options: storage.StorageOptions | None) -> list[dict[str, Any]]:
    return json.loads(gzip.decompress(storage.read_bytes(uri, storage_options)))


def plan_shards(job: PrepareJob, done: set[str] | frozenset[str] = frozenset()) -> Plan:
    """Stream the annotations into shards, writing each shard not in ``done`` to its plan file
    (``out/plan/shard-NNNNN.json.gz``) for a worker to read; the driver's memory holds one shard, whatever the
    corpus's size."""
    so = job.storage_options or None
    plan = Plan()
    for index, records in iter_shards(job):
        plan.shards += 1
        plan.images += len(records)
        plan.input_regions += sum(len(r.get("regions") or []) for r in records)
        if shard_name(index) not in done:
            data = gzip.compress(json.dumps(records, separators=(",", ":")).encode(), compresslevel=1)
            storage.write_bytes(plan_uri(job, index), data, so)
            plan.todo.append(index)
    return plan


def _manifest(job: PrepareJob, num_shards: int | None) -> dict[str, Any]:
    return {"dataset": job.dataset, "root": job.root, "split": job.split, "shards": num_shards,
            "images_per_shard": job.images_per_shard, "prepare": dataclasses.asdict(job.prepare)}


def check_manifest(job: PrepareJob, num_shards: int | None, force: bool) -> None:
    """A rerun must prepare the same thing into the same place; a different one needs --force.

    ``num_shards=None`` (before planning) compares everything but the shard count and writes nothing, except
    that ``force`` empties the output; with the count (after planning) the manifest is compared and written.
    """
    so = job.storage_options or None
    manifest = _manifest(job, num_shards)
    uri = storage.join(job.out, "manifest.json")
    if storage.exists(uri, so) and not force:
        old = storage.read_json(uri, so)
        if num_shards is None:
            old = {**old, "shards": None}
        if old != manifest:
            raise ValueError(f"{job.out} holds a different preparation ({uri}); use a new --out or --force")
    if num_shards is None:
        if force:
            for sub in ("regions", "errors", "plan"):
                for name in storage.listdir(storage.join(job.out, sub), so):
                    storage.remove(storage.join(job.out, sub, name), so)
        return
    storage.write_json(uri, manifest, so)


def run(job: PrepareJob, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare the whole dataset on the connected Ray cluster; returns (and writes) the summary."""
    import ray
    from tqdm import tqdm

    so = job.storage_options or None
    start = time.perf_counter()
    check_manifest(job, None, force)
    done = set(storage.listdir(storage.join(job.out, "regions"), so))
    for name in storage.listdir(storage.join(job.out, "plan"), so):  # a killed run's plans of shards now written
        if name.replace(".json.gz", ".parquet") in done:
            remove_plan(job, int(name[6:11]))
    plan = plan_shards(job, done)
    check_manifest(job, plan.shards, force)
    log.info("%d shards (%d images); %d already written, %d to do", plan.shards, plan.images,
             plan.shards - len(plan.todo), len(plan.todo))
    results: list[dict[str, Any]] = []
    if plan.todo:
        items = [{"shard": i, "plan": plan_uri(job, i)} for i in plan.todo]
        workers = job.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            PrepareShards, fn_constructor_kwargs={"job": dataclasses.asdict(job)}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))), num_cpus=1,
        )
        with tqdm(total=plan.images, initial=plan.images - _images_todo(plan, job), unit="img", desc="prepare",
                  disable=not progress) as bar:
            for row in ds.iter_rows():
                results.append(row)
                remove_plan(job, int(row["shard"]))
                bar.update(int(row["images"]))
                bar.set_postfix(regions=sum(int(r["regions"]) for r in results),
                                errors=sum(int(r["region_errors"]) + int(r["image_errors"]) for r in results))
    input_regions = plan.input_regions
    summary = summarize(job, plan.shards, input_regions, time.perf_counter() - start)
    summary["shards_written_now"] = len(plan.todo)
    storage.write_json(storage.join(job.out, "summary.json"), summary, so)
    return summary


def _images_todo(plan: Plan, job: PrepareJob) -> int:
    """Images in the shards to do (every shard is full but the last)."""
    last = plan.shards - 1
    return sum(plan.images - last * job.images_per_shard if i == last else job.images_per_shard for i in plan.todo)


def summarize(job: PrepareJob, num_shards: int, input_regions: int, seconds: float) -> dict[str, Any]:
    """Counts over every shard on disk (not just this run's), the tag vocabulary, and the balance check."""
    so = job.storage_options or None
    n_rows = region_errors = image_errors = 0
    reasons: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for sub, columns in (("regions", ["tags"]), ("errors", ["region_id", "reason"])):
        # One shard file at a time, so the driver's memory does not grow with the corpus here either.
        names = [n for n in storage.listdir(storage.join(job.out, sub), so) if n.startswith("shard-")
                 and n.endswith(".parquet")] if num_shards else []  # not a killed writer's .tmp-PID file
        for name in names:
            fs, path = storage.filesystem(storage.join(job.out, sub, name), so)
            table = pq.read_table(path, filesystem=fs, columns=columns)
            if sub == "regions":
                n_rows += table.num_rows
                counts.update(t for tags in table["tags"].to_pylist() for t in tags)
            else:
                with_region = table.filter(table["region_id"].is_valid()).num_rows
                region_errors += with_region
                image_errors += table.num_rows - with_region
                reasons.update(table["reason"].to_pylist())
    if num_shards:
        TagVocabulary.from_counts(counts).save(storage.join(job.out, "tags.json"), so)
    reasons = dict(reasons)
    return {
        "shards": num_shards, "input_regions": input_regions, "regions": n_rows, "region_errors": region_errors,
        "image_errors": image_errors, "errors_by_reason": reasons, "balanced": input_regions == n_rows + region_errors,
        "seconds": round(seconds, 2), "regions_per_second": round(n_rows / seconds, 1) if seconds else None,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML under configs/prepare/")
    p.add_argument("--root", help="dataset directory or s3:// prefix (overrides the config)")
    p.add_argument("--out", help="output directory or s3:// prefix (overrides the config)")
    p.add_argument("--split", help="only this split")
    p.add_argument("--workers", type=int, help="concurrent CPU tasks")
    p.add_argument("--force", action="store_true", help="discard shards already written and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_args(p)
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    job = PrepareJob.from_yaml(args.config, root=args.root, out=args.out, split=args.split, workers=args.workers,
                               storage_options=storage_options_from_args(args) or None)
    init_ray(args)
    summary = run(job, force=args.force, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0 if summary["balanced"] else 1


if __name__ == "__main__":
    sys.exit(main())
