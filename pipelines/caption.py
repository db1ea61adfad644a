"""Bulk region captioning with Ray Data: CPU tasks cut the chosen views, a model actor pool predicts.

Input is the prepare stage's output (one row per region, with view boxes and pHASH codes). For each prepared shard,
a CPU task decodes its images and builds model inputs with the task's view choice (pHASH greedy or fixed t);
an actor pool that loads the exported model once per actor (GPU actors when GPUs exist) predicts captions and
tags; the driver writes ``captions/shard-NNNNN.{parquet,jsonl}`` once every region of a shard is back, so a
killed job, rerun, finishes the missing shards and every region comes out exactly once (as a row or an error).

    dynrefer caption --model EXPORT --prepared PREPARED --out OUT [--split test] [--views phash|fixed]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynrefer import storage
from dynrefer.batching import build_inputs, load_images
from dynrefer.config import DynReferConfig, _build
from dynrefer.imageio import ImageError
from pipelines.args import add_ray_args, add_storage_args, init_ray, setup_logging, storage_options_from_args
from pipelines.prepare import shard_name

log = logging.getLogger("dynrefer.caption")

OUTPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("region_id", pa.string()), ("box", pa.list_(pa.float64(), 4)),
    ("caption", pa.string()), ("tags", pa.list_(pa.string())), ("tag_scores", pa.list_(pa.float32())),
    ("view_ts", pa.list_(pa.float32())), ("error", pa.string()),
])


@dataclass
class CaptionJob:
    model: str = ""  # exported model directory (local or s3://)
    prepared: str = ""  # the prepare stage's output
    out: str = ""
    split: str | None = None
    views: str = "phash"  # "phash" (greedy over pHASH codes) or "fixed" (the model config's fixed_ts)
    batch_size: int = 32
    actors: int = 1  # model replicas
    gpus_per_actor: float = 0.0  # 0: CPU actors
    cpus_per_actor: float = 1.0
    format: str = "parquet"  # or "jsonl"
    storage_options: dict[str, Any] = field(default_factory=dict)


def model_config(job: CaptionJob) -> DynReferConfig:
    return DynReferConfig.from_dict(storage.read_json(storage.join(job.model, "config.json"), job.storage_options or None))


def shard_inputs(shard: int, job: CaptionJob, cfg: DynReferConfig, prepared_size: int | None
                 ) -> Iterator[dict[str, Any]]:
    """Model-input batches for one prepared shard; regions whose image cannot be read come out as error rows."""
    so = job.storage_options or None
    fs, path = storage.filesystem(storage.join(job.prepared, "regions", shard_name(shard)), so)
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    if job.split is not None:
        rows = [r for r in rows if r.get("split") == job.split]
    total = len(rows)
    for start in range(0, total, job.batch_size):
        chunk = rows[start: start + job.batch_size]
        images, failed = {}, {}
        for file in dict.fromkeys(r["file"] for r in chunk):
            try:
                images.update(load_images([file], so))
            except (ImageError, OSError) as e:
                failed[file] = str(e)
        good = [r for r in chunk if r["file"] not in failed]
        base = {"shard": shard, "shard_total": total}
        if good:
            inputs = build_inputs(good, images, cfg.views, cfg.image_size, job.views, prepared_size=prepared_size)
            yield {**{k: np.full(len(good), v) for k, v in base.items()},
                   "image_id": np.array([r["image_id"] for r in good], dtype=object),
                   "region_id": np.array(inputs.region_ids, dtype=object),
                   "box": np.array([r["box"] for r in good], dtype=np.float64),
                   "views": inputs.views, "rois": inputs.rois, "ts": inputs.ts,
                   "error": np.array([""] * len(good), dtype=object)}
        bad = [r for r in chunk if r["file"] in failed]
        if bad:
            size = cfg.image_size
            yield {**{k: np.full(len(bad), v) for k, v in base.items()},
                   "image_id": np.array([r["image_id"] for r in bad], dtype=object),
                   "region_id": np.array([r["region_id"] for r in bad], dtype=object),
                   "box": np.array([r["box"] for r in bad], dtype=np.float64),
                   "views": np.zeros((len(bad), cfg.views.num_views, size, size, 3), dtype=np.uint8),
                   "rois": np.zeros((len(bad), cfg.views.num_views, 4), dtype=np.float32),
                   "ts": np.zeros((len(bad), cfg.views.num_views), dtype=np.float32),
                   "error": np.array([failed[r["file"]] for r in bad], dtype=object)}


class ShardInputs:
    """Ray Data CPU stage: a thin callable around :func:`shard_inputs`."""

    def __init__(self, job: dict[str, Any]):
        self.job = _build(CaptionJob, job, "job")
        self.cfg = model_config(self.job)
        manifest = storage.read_json(storage.join(self.job.prepared, "manifest.json"), self.job.storage_options or None)
        self.prepared_size = manifest["prepare"]["view_size"]

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        for shard in batch["shard"]:
            yield from shard_inputs(int(shard), self.job, self.cfg, self.prepared_size)


def predict_batch(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Captions and tags for one batch of model inputs; error rows pass through untouched."""
    import torch

    ok = np.array([not e for e in batch["error"]], dtype=bool)
    n = len(ok)
    captions = np.array([""] * n, dtype=object)
    tags = np.empty(n, dtype=object)
    scores = np.empty(n, dtype=object)
    tags[:] = [[] for _ in range(n)]
    scores[:] = [[] for _ in range(n)]
    if ok.any():
        device = next(model.parameters()).device
        preds = model.predict(torch.as_tensor(batch["views"][ok]).to(device),
                              torch.as_tensor(batch["rois"][ok]).to(device))
        for i, p in zip(np.flatnonzero(ok), preds):
            captions[i] = p.caption
            tags[i] = [t for t, _ in p.tags]
            scores[i] = [float(s) for _, s in p.tags]
    return {"shard": batch["shard"], "shard_total": batch["shard_total"], "image_id": batch["image_id"],
            "region_id": batch["region_id"], "box": batch["box"], "caption": captions, "tags": tags,
            "tag_scores": scores, "view_ts": batch["ts"], "error": batch["error"]}


class CaptionModel:
    """Ray Data actor: loads the exported model once, then captions every batch it is given."""

    def __init__(self, job: dict[str, Any]):
        import torch

        from dynrefer.checkpoint import load_pretrained

        self.job = _build(CaptionJob, job, "job")
        device = "cuda" if self.job.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.model = load_pretrained(self.job.model, self.job.storage_options or None, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict_batch(self.model, batch)


def encode(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def output_name(shard: int, fmt: str) -> str:
    return shard_name(shard).replace(".parquet", ".jsonl" if fmt == "jsonl" else ".parquet")


def run(job: CaptionJob, progress: bool = True) -> dict[str, Any]:
    """Caption every prepared region not captioned yet; returns (and writes) the summary."""
    import ray
    from tqdm import tqdm

    if job.views not in ("phash", "fixed"):
        raise ValueError(f"views must be 'phash' or 'fixed', got {job.views!r}")
    so = job.storage_options or None
    start = time.perf_counter()
    shards = sorted(int(n[6:11]) for n in storage.listdir(storage.join(job.prepared, "regions"), so)
                    if n.startswith("shard-"))
    done = set(storage.listdir(storage.join(job.out, "captions"), so))
    todo = [s for s in shards if output_name(s, job.format) not in done]
    log.info("%d prepared shards; %d already captioned, %d to do", len(shards), len(shards) - len(todo), len(todo))
    if todo:
        spec = dataclasses.asdict(job)
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(ShardInputs, fn_constructor_kwargs={"job": spec}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        ds = ds.map_batches(CaptionModel, fn_constructor_kwargs={"job": spec}, batch_size=job.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=job.cpus_per_actor,
                            num_gpus=job.gpus_per_actor)
        pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
        with tqdm(unit="region", desc="caption", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(batch["region_id"])):
                    shard = int(batch["shard"][i])
                    pending[shard].append({
                        "image_id": str(batch["image_id"][i]), "region_id": str(batch["region_id"][i]),
                        "box": [float(v) for v in batch["box"][i]], "caption": str(batch["caption"][i]),
                        "tags": list(batch["tags"][i]), "tag_scores": [float(v) for v in batch["tag_scores"][i]],
                        "view_ts": [float(v) for v in batch["view_ts"][i]],
                        "error": str(batch["error"][i]) or None,
                    })
                    if len(pending[shard]) == int(batch["shard_total"][i]):
                        rows = sorted(pending.pop(shard), key=lambda r: r["region_id"])
                        storage.write_bytes(storage.join(job.out, "captions", output_name(shard, job.format)),
                                            encode(rows, job.format), so)
                bar.update(len(batch["region_id"]))
        if pending:
            raise RuntimeError(f"shards {sorted(pending)} did not come back whole")
    summary = summarize(job, len(todo), time.perf_counter() - start)
    storage.write_json(storage.join(job.out, "summary.json"), summary, so)
    return summary


def summarize(job: CaptionJob, written_now: int, seconds: float) -> dict[str, Any]:
    """Counts over every output shard on disk, checked against the prepared rows of the split."""
    so = job.storage_options or None
    fs, path = storage.filesystem(storage.join(job.prepared, "regions"), so)
    prepared = pq.read_table(path, filesystem=fs, columns=["region_id", "split"])
    if job.split is not None:
        prepared = prepared.filter(pa.compute.equal(prepared["split"], job.split))
    out_rows = read_captions(job.out, job.format, so)
    ids = [r["region_id"] for r in out_rows]
    errors = sum(1 for r in out_rows if r.get("error"))
    return {"prepared_regions": prepared.num_rows, "captioned": len(ids) - errors, "errors": errors,
            "exactly_once": sorted(ids) == sorted(prepared["region_id"].to_pylist()),
            "shards_written_now": written_now, "seconds": round(seconds, 2),
            "regions_per_second": round(len(ids) / seconds, 1) if seconds and written_now else None}


def read_captions(out: str, fmt: str = "parquet", storage_options: storage.StorageOptions | None = None
                  ) -> list[dict[str, Any]]:
    """Every caption row written under ``out``."""
    rows: list[dict[str, Any]] = []
    for name in storage.listdir(storage.join(out, "captions"), storage_options):
        data = storage.read_bytes(storage.join(out, "captions", name), storage_options)
        if name.endswith(".jsonl"):
            rows.extend(json.loads(line) for line in data.decode().splitlines() if line.strip())
        elif name.endswith(".parquet"):
            rows.extend(pq.read_table(io.BytesIO(data)).to_pylist())
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model directory (local or s3://)")
    p.add_argument("--prepared", required=True, help="the prepare stage's output directory")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--split", help="only regions of this split")
    p.add_argument("--views", default="phash", choices=["phash", "fixed"], help="view choice at inference")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=1, help="model replicas")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_args(p)
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    job = CaptionJob(model=args.model, prepared=args.prepared, out=args.out, split=args.split, views=args.views,
                     batch_size=args.batch_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                     format=args.format, storage_options=storage_options_from_args(args))
    init_ray(args)
    summary = run(job, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0 if summary["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
