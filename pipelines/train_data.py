"""The prepared data as the DynRefer Ray Train programs read it: row tables, vocabularies, Ray Datasets of views.

The driver reads a few columns of every prepared row (splits, captions, labels) and the tag vocabularies; the
workers get Ray Datasets whose map stage decodes each image once and crops every region's views, drawn afresh
each epoch for training, as at inference time for the held-out slice.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynrefer import storage
from dynrefer.batching import ModelInputs, build_inputs, load_images, region_rng
from dynrefer.config import DynReferConfig, ViewConfig, _build
from dynrefer.storage import arrow_filesystem
from dynrefer.tags import TagVocabulary
from pipelines.train_job import PreparedData, RayTrainJob, TrainJob
from pipelines.training_loop import epochs

log = logging.getLogger("dynrefer.train_data")

#: Columns of the prepared rows the map stage needs.
ROW_COLUMNS = ["region_id", "file", "width", "height", "box", "caption", "captions", "tags", "ts", "view_boxes",
               "rois", "phash"]


def region_table(paths: list[str], storage_options: storage.StorageOptions | None, columns: list[str]) -> pa.Table:
    """Some columns of every prepared row, across all the prepared directories."""
    tables = []
    for uri in paths:
        fs, path = arrow_filesystem(storage.join(uri, "regions"), storage_options)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def prepared_view_size(paths: list[str], storage_options: storage.StorageOptions | None) -> int | None:
    """The view size the rows were prepared at (their RoIs' frame), when every directory agrees on one."""
    sizes = set()
    for uri in paths:
        manifest = storage.join(uri, "manifest.json")
        if not storage.exists(manifest, storage_options):
            return None
        sizes.add(storage.read_json(manifest, storage_options).get("prepare", {}).get("view_size"))
    return sizes.pop() if len(sizes) == 1 else None


def tag_vocabulary(paths: list[str], storage_options: storage.StorageOptions | None, max_tags: int) -> list[str]:
    """The ``max_tags`` most frequent tags over the prepared directories' tags.json files."""
    counts: Counter[str] = Counter()
    for uri in paths:
        vocab = TagVocabulary.load(storage.join(uri, "tags.json"), storage_options)
        counts.update(dict(zip(vocab.tags, vocab.counts)))
    return TagVocabulary.from_counts(counts, max_size=max_tags).tags if max_tags > 0 else []


def caption_words(captions: list[str | None]) -> list[str]:
    """Words as the word-level LM tokenizer splits them (lowercase, whitespace, punctuation), most frequent first."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    counts = Counter(w for c in captions if c for w, _ in split.pre_tokenize_str(c.lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda wn: (-wn[1], wn[0]))]


def label_names(column: pa.ChunkedArray) -> list[str]:
    """The distinct non-empty labels of a category column (strings) or attributes column (lists), sorted."""
    values = column.to_pylist()
    flat = (v for value in values for v in (value if isinstance(value, list) else [value]))
    return sorted({str(v) for v in flat if v})



def split_filter(split: str) -> str:
    if not re.fullmatch(r"[\w.-]+", split):
        raise ValueError(f"split names are words, got {split!r}")
    return f"split == '{split}'"


@dataclass(frozen=True)
class StageSettings:
    """What the view stage needs to know; travels to the Ray Data tasks with each call."""

    views: dict[str, Any]
    size: int  # the model's view size
    mode: str  # "train" (fresh random views each epoch), "phash" or "fixed"
    seed: int
    prepared_size: int | None  # the view size of the prepared RoIs
    storage_options: dict[str, Any] | None
    references: bool = False  # also pass every region's reference captions (for scoring)


def build_stage_inputs(batch: pa.Table, settings: StageSettings) -> dict[str, np.ndarray]:
    """Ray Data stage: decode each image of a batch once and crop every region's views (dynrefer.batching).

    It runs as tasks, not actors: ``streaming_split`` builds a new pipeline every epoch, and pooled task workers
    start faster than a new actor pool.
    """
    rows = batch.to_pylist()
    views = _build(ViewConfig, settings.views, "views")
    images = load_images((r["file"] for r in rows), settings.storage_options)
    # "draw" is new every epoch (Ray Data's random expression), so each sighting of a region draws anew.
    rngs = [region_rng(settings.seed, int(r["draw"] * 2**32), r["region_id"]) for r in rows] \
        if settings.mode == "train" else None
    out = build_inputs(rows, images, views, settings.size, settings.mode, rngs, settings.prepared_size).to_columns()
    if settings.references:
        refs = np.empty(len(rows), dtype=object)
        refs[:] = [list(r["captions"] or [r["caption"] or ""]) for r in rows]
        out["references"] = refs
    return out


def view_dataset(data: PreparedData, split: str, settings: StageSettings, seed: int,
                 storage_options: storage.StorageOptions | None, limit: int | None = None) -> Any:
    """One split of the prepared shards as a Ray Dataset of model inputs (views cropped by the view stage).

    In ``train`` mode the files are read in a seeded random order and each region draws new views every epoch.
    """
    import ray.data
    from ray.data import FileShuffleConfig
    from ray.data.expressions import random as random_expr

    fs, _ = arrow_filesystem(data.prepared[0], storage_options)
    paths = [arrow_filesystem(storage.join(p, "regions"), storage_options)[1] for p in data.prepared]
    train = settings.mode == "train"
    ds = ray.data.read_parquet(
        paths, filesystem=fs, columns=ROW_COLUMNS + ["split"], num_cpus=data.read_cpus,
        shuffle=FileShuffleConfig(seed=seed) if train else None,
    ).filter(expr=split_filter(split))
    if limit is not None:
        ds = ds.limit(limit)
    if train:
        ds = ds.with_column("draw", random_expr(seed=seed))
    return ds.map_batches(
        build_stage_inputs, fn_kwargs={"settings": settings}, batch_size=data.decode_batch, batch_format="pyarrow",
        num_cpus=data.decode_cpus, compute=ray.data.TaskPoolStrategy(size=data.decode_workers),
    )


def datasets(job: TrainJob, cfg: DynReferConfig, prepared_size: int | None, with_val: bool) -> dict[str, Any]:
    """The train split with views drawn afresh each epoch, and the val slice with the inference-time views."""
    so = job.storage_options or None
    stage = StageSettings(views=dataclasses.asdict(cfg.views), size=cfg.image_size, mode="train", seed=job.seed,
                          prepared_size=prepared_size, storage_options=so)
    out = {"train": view_dataset(job.data, job.data.train_split, stage, job.seed, so)}
    if with_val:
        val = dataclasses.replace(stage, mode=cfg.views.selection, references=True)
        out["val"] = view_dataset(job.data, job.data.val_split, val, job.seed, so, limit=job.eval.max_regions)
    return out


def data_config(data: PreparedData) -> Any:
    """Ray Train's dataset settings: Ray Data's order kept when the data section asks for determinism."""
    from ray.train import DataConfig

    if not data.deterministic:
        return DataConfig()
    from ray.data import ExecutionOptions

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True))



def split_counts(job: RayTrainJob, table: pa.Table, what: str) -> tuple[Counter[str], bool]:
    """Rows per split (the train split must have some), and whether there is a held-out split to evaluate on
    (``what``: the evaluation, as the warning names it when there is none)."""
    splits = Counter(table["split"].to_pylist())
    if not splits.get(job.data.train_split):
        raise ValueError(f"{job.data.prepared}: no rows of split {job.data.train_split!r} (splits found: "
                         f"{dict(splits)}); prepare the data with its split labels")
    with_val = job.eval.every >= 0 and splits.get(job.data.val_split, 0) > 0
    if job.eval.every >= 0 and not with_val:
        log.warning("no rows of split %r: %s is skipped", job.data.val_split, what)
    return splits, with_val


def train_batches(shard: Any, job: RayTrainJob, rank: int) -> Iterator[ModelInputs]:
    """Micro-batches without end: one Ray Data epoch after another (each draws new views)."""
    for batch in epochs(shard, job.batch_size, job.data.shuffle_buffer, job.seed, rank):
        yield ModelInputs.from_columns(batch)
