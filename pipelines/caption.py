"""Bulk region captioning with Ray Data: given boxes or dense captioning, a model actor pool predicts.

Two inputs. (a) The prepare stage's output (one row per region, with view boxes and pHASH codes): a CPU task per
prepared shard decodes its images and builds model inputs. (b) Images alone (dense captioning): a Visual Genome
root, a COCO images file, a list file or a directory of images, cut into shards of images; the boxes come from a
class-agnostic proposal model (an actor pool, GPU actors when asked) or from a detector's COCO-format detections
file; then the prepare stage's own per-image code (:mod:`dynrefer.preprocess`) turns every image and its boxes into
region rows. Either way an actor pool that loads the exported model once per actor predicts captions, tags,
category and attributes; the driver writes ``captions/shard-NNNNN.{parquet,jsonl}`` once every row of a shard is
back, so a killed job, rerun, finishes the missing shards and every region comes out exactly once (as a row or an
error row).

Error rows carry the message in ``error`` and a short code in ``reason``, the codes the prepare stage writes:
``missing`` (no such file), ``read_error``, the decoder's ``empty``, ``not_image``, ``corrupt``, ``truncated``,
``too_large`` and ``unsupported_mode``, ``bad_box``, ``bad_record`` (a malformed annotation entry) and
``bad_detection`` (a malformed entry of a detections file).

    dynrefer caption --model EXPORT --prepared PREPARED --out OUT [--split test] [--views phash|fixed]
    dynrefer caption --model EXPORT --images VG_ROOT|DIR|LIST.txt|COCO.json --proposals PROPOSER --out OUT
    dynrefer caption --model EXPORT --images ... --detections DETECTIONS.json --out OUT [--min-score 0.3]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import logging
import math
import posixpath
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dynrefer import datasets, storage
from dynrefer.batching import build_inputs, load_images, share_views
from dynrefer.config import DynReferConfig, _build
from dynrefer.imageio import ImageError
from dynrefer.preprocess import PrepareConfig, decode_record, error_row, preprocess_image, region_rows
from dynrefer.proposal_filter import keep_proposals
from pipelines.args import add_ray_args, add_storage_args, init_ray, setup_logging, storage_options_from_args
from pipelines.prepare import read_image_bytes, shard_name

log = logging.getLogger("dynrefer.caption")

SCORES = pa.map_(pa.string(), pa.float32())
OUTPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("region_id", pa.string()), ("box", pa.list_(pa.float64(), 4)),
    ("score", pa.float64()), ("detection_category_id", pa.string()),
    ("caption", pa.string()), ("caption_score", pa.float32()),
    ("tags", pa.list_(pa.string())), ("tag_scores", pa.list_(pa.float32())),
    ("category", pa.string()), ("category_score", pa.float32()), ("category_scores", SCORES),
    ("attributes", pa.list_(pa.string())), ("attribute_scores", SCORES),
    ("view_ts", pa.list_(pa.float32())), ("error", pa.string()), ("reason", pa.string()),
])
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class CaptionJob:
    model: str = ""  # exported model directory (local or s3://)
    prepared: str | None = None  # (a) the prepare stage's output
    images: str | None = None  # (b) dense: a VG root, a COCO images JSON, a .txt list of image URIs or a directory
    image_root: str | None = None  # COCO images JSON: where its file_names lie (default: the JSON's folder)
    proposals: str | None = None  # dense: an exported proposal model (dynrefer.proposals.load_proposer)
    detections: str | None = None  # dense: COCO-format detections JSON instead of a proposal model
    min_score: float = 0.0  # dense: proposals/detections scoring less are dropped
    max_regions: int = 50  # dense: at most this many regions per image, best first
    images_per_shard: int = 16  # dense: images per output shard
    out: str = ""
    split: str | None = None
    views: str = "phash"  # "phash" (greedy over pHASH codes) or "fixed" (the model config's fixed_ts)
    batch_size: int = 32
    actors: int = 1  # model replicas
    gpus_per_actor: float = 0.0  # 0: CPU actors
    cpus_per_actor: float = 1.0
    actor_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each model replica needs
    proposers: int = 1  # proposal model replicas
    gpus_per_proposer: float = 0.0
    cpus_per_proposer: float = 1.0
    input_workers: int = 1  # CPU actors that decode images and cut views (about 330 regions/s each at 224 px)
    cpus_per_input_worker: float = 1.0
    format: str = "parquet"  # or "jsonl"
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.images is not None


def validate_job(job: CaptionJob) -> None:
    """Refuse contradictory inputs before any work starts."""
    if job.views not in ("phash", "fixed"):
        raise ValueError(f"views must be 'phash' or 'fixed', got {job.views!r}")
    if (job.prepared is None) == (job.images is None):
        raise ValueError("give exactly one input: prepared (regions with boxes) or images (dense captioning)")
    if job.images is None and (job.proposals or job.detections):
        raise ValueError("proposals and detections are for images (dense captioning), not prepared regions")
    if job.images is not None and (job.proposals is None) == (job.detections is None):
        raise ValueError("dense captioning needs exactly one box source: proposals (a model) or detections (a file)")
    if min(job.max_regions, job.images_per_shard, job.batch_size, job.actors, job.input_workers, job.proposers) < 1:
        raise ValueError("max_regions, images_per_shard, batch_size, actors, input_workers and proposers must be "
                         "at least 1")


def model_config(job: CaptionJob) -> DynReferConfig:
    so = job.storage_options or None
    return DynReferConfig.from_dict(storage.read_json(storage.join(job.model, "config.json"), so))


def view_config(cfg: DynReferConfig) -> PrepareConfig:
    """Dense regions get the views the model can choose from, cut at its input size."""
    return PrepareConfig(view_size=cfg.image_size, candidate_ts=list(cfg.views.candidate_ts), hash=cfg.views.hash)


# --- images and boxes (dense captioning) --------------------------------------------------------------------------

def image_records(images: str, split: str | None = None, image_root: str | None = None,
                  storage_options: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """``{"image_id", "file", "split", "regions": []}`` per image of a Visual Genome root (``region_descriptions.json``,
    optionally one split), a COCO JSON's ``images`` (``id``, ``file_name`` under ``image_root``), a ``.txt`` list
    of image URIs or a directory of images (image id: the file name without its suffix)."""
    so = storage_options
    listed = images.endswith((".json", ".txt"))
    is_vg = not listed and storage.exists(storage.join(images, "region_descriptions.json"), so)
    if split is not None and not is_vg:
        raise ValueError(f"{images}: a split needs a Visual Genome root (with region_descriptions.json and splits/)")
    if is_vg:
        records = [{**{k: r[k] for k in ("image_id", "file", "split")}, "regions": [],
                    **({"error": r["error"]} if "error" in r else {})}
                   for r in datasets.read_visual_genome(images, split=split, storage_options=so, record_errors=True,
                                                        with_regions=False)]
    elif images.endswith(".json"):
        records = _coco_images(images, image_root or posixpath.dirname(images), so)
    else:
        if images.endswith(".txt"):
            files = [line.strip() for line in storage.read_bytes(images, so).decode().splitlines() if line.strip()]
        else:
            files = [storage.join(images, n) for n in sorted(storage.listdir(images, so))
                     if n.lower().endswith(IMAGE_SUFFIXES)]
        records = [{"image_id": image_id, "file": f, "split": None, "regions": []}
                   for image_id, f in zip(file_ids(files, images), files)]
    if not records:
        raise ValueError(f"{images}: no images" + (f" in split {split!r}" if split else ""))
    seen: dict[str, str] = {}
    for r in records:
        if r["image_id"] in seen:
            raise ValueError(f"{images}: image id {r['image_id']!r} names two files: {seen[r['image_id']]} and "
                             f"{r['file']}")
        seen[r["image_id"]] = r["file"]
    return records


def file_ids(files: Sequence[str], source: str = "images") -> list[str]:
    """Image ids for files named alone (a directory, a list): the name without its suffix, as detections files
    name them; files that share a stem (``x.jpg``, ``x.png``) are told apart by their whole name, and files that
    share a name (``a/x.jpg``, ``b/x.jpg``) by as many parent folders as it takes. The same files always get the
    same ids. A file listed twice is refused."""
    seen: dict[str, int] = {}
    for i, f in enumerate(files):
        if f in seen:
            raise ValueError(f"{source}: {f} is listed twice (lines {seen[f] + 1} and {i + 1})")
        seen[f] = i
    ids = [posixpath.splitext(posixpath.basename(f.rstrip("/")))[0] for f in files]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, image_id in enumerate(ids):
        groups[image_id].append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        parts = {i: [p for p in files[i].split("/") if p] for i in members}
        depth = 1
        while True:
            names = {i: "/".join(parts[i][-depth:]) for i in members}
            if len(set(names.values())) == len(members) or depth > max(len(p) for p in parts.values()):
                break
            depth += 1
        for i in members:
            ids[i] = names[i]
    taken: dict[str, str] = {}
    for image_id, f in zip(ids, files):
        if image_id in taken:  # "x.png" beside a stem "x.png" of "x.png.jpg": too odd to rename silently
            raise ValueError(f"{source}: image id {image_id!r} names two files: {taken[image_id]} and {f}; rename "
                             f"one")
        taken[image_id] = f
    return ids


def _coco_images(uri: str, root: str, so: storage.StorageOptions | None) -> list[dict[str, Any]]:
    """The ``images`` of a COCO JSON, streamed (an instances file's annotations are skipped, never parsed)."""
    try:
        entries = datasets.json_section(uri, datasets.top_level_kinds(uri, so), "images", so)
    except ValueError as e:
        raise ValueError(f"{uri}: expected a COCO JSON object with an 'images' list ({e})") from None
    records = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), (int, str))
                and isinstance(entry.get("file_name"), str) and entry["file_name"]):
            raise ValueError(f"{uri}: images[{i}]: needs an integer or string 'id' and a 'file_name'")
        records.append({"image_id": str(entry["id"]), "file": storage.join(root, entry["file_name"]), "split": None,
                        "regions": []})
    return records


def select_regions(candidates: Sequence[dict[str, Any]], min_score: float, max_regions: int) -> list[dict[str, Any]]:
    """The best ``max_regions`` candidate regions (each with a ``score``) scoring at least ``min_score``."""
    kept = [c for c in candidates if c["score"] >= min_score]
    return sorted(kept, key=lambda c: -c["score"])[:max_regions]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _detection_problem(entry: Any, known: set[str]) -> str | None:
    """Why a detections entry cannot be used, or None."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    if not isinstance(entry.get("image_id"), (int, str)) or isinstance(entry.get("image_id"), bool):
        return f"'image_id' must be an integer or string, got {entry.get('image_id')!r}"
    if str(entry["image_id"]) not in known:
        return f"image_id {entry['image_id']!r} is not among the images"
    bbox = entry.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
        return f"'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"'bbox' {bbox} has zero or negative width or height"
    if not _number(entry.get("score")):
        return f"'score' must be a finite number, got {entry.get('score')!r}"
    if "category_id" in entry and not isinstance(entry["category_id"], (int, str)):
        return f"'category_id' must be an integer or string, got {entry['category_id']!r}"
    return None


def attach_detections(records: list[dict[str, Any]], detections: Any, uri: str, min_score: float,
                      max_regions: int) -> list[dict[str, Any]]:
    """Give each image record the regions its detections name (best first, after ``min_score`` and
    ``max_regions``); returns an error row per malformed entry, naming it (region id ``det-<entry index>``).

    ``detections`` is the parsed list or an iterator over its entries (the file streamed, as :func:`plan` reads
    it), so that the driver holds the regions kept rather than the whole file."""
    if not isinstance(detections, (list, Iterator)):
        raise ValueError(f"{uri}: expected a JSON list of detections, got {type(detections).__name__}")
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    errors = []
    known = {r["image_id"] for r in records}
    for i, entry in enumerate(detections):
        problem = _detection_problem(entry, known)
        if problem:
            image_id = entry.get("image_id") if isinstance(entry, dict) else None
            errors.append({"image_id": None if image_id is None else str(image_id), "region_id": f"det-{i}",
                           "reason": "bad_detection", "message": f"{uri}[{i}]: {problem}"})
            continue
        x, y, w, h = (float(v) for v in entry["bbox"])
        category = entry.get("category_id")
        by_image[str(entry["image_id"])].append({
            "region_id": f"{entry['image_id']}-det{i}", "box": [x, y, x + w, y + h], "score": float(entry["score"]),
            "detection_category_id": None if category is None else str(category)})
    for record in records:
        record["regions"] = select_regions(by_image.get(record["image_id"], []), min_score, max_regions)
    return errors


def propose_shard(proposer: Any, records: list[dict[str, Any]], job: CaptionJob) -> list[dict[str, Any]]:
    """The records with their proposed regions (best first, after ``min_score`` and ``max_regions``); an
    unreadable image keeps none (the next stage turns it into its error row). Proposals with less than a pixel
    inside the image are no regions and are not kept (:func:`dynrefer.proposal_filter.keep_proposals`, the rule
    Serve applies too)."""
    so = job.storage_options or None
    prep = PrepareConfig()
    for start in range(0, len(records), job.batch_size):
        decoded: list[tuple[dict[str, Any], Image.Image]] = []
        for record in records[start: start + job.batch_size]:
            if "error" in record:
                continue
            try:
                image, _ = decode_record(record, read_image_bytes(record["file"], so), prep)
            except OSError:
                continue
            if image is not None:
                decoded.append((record, image))
        proposed = proposer.propose_batch([image for _, image in decoded]) if decoded else []
        for (record, image), boxes in zip(decoded, proposed):
            kept = keep_proposals(boxes, *image.size, job.min_score, job.max_regions)
            record["regions"] = [{"region_id": f"{record['image_id']}-p{k}", "box": box, "score": score,
                                  "detection_category_id": None} for k, (box, score) in enumerate(kept)]
    return records


class ProposeRegions:
    """Ray Data actor: loads the proposal model once, then proposes the regions of every shard of images."""

    def __init__(self, job: dict[str, Any]):
        import torch

        from dynrefer.proposals import load_proposer

        self.job = _build(CaptionJob, job, "job")
        device = "cuda" if self.job.gpus_per_proposer > 0 and torch.cuda.is_available() else "cpu"
        self.proposer = load_proposer(self.job.proposals, self.job.storage_options or None, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        so = self.job.storage_options or None
        records = [json.dumps(propose_shard(self.proposer, read_plan(str(p), so)["records"], self.job))
                   for p in batch["plan"]]
        return {**batch, "records": np.array(records, dtype=object)}


# --- model inputs -------------------------------------------------------------------------------------------------

def _column(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def input_batch(rows: Sequence[dict[str, Any]], images: dict[str, Image.Image], cfg: DynReferConfig, job: CaptionJob,
                prepared_size: int | None, base: dict[str, Any]) -> dict[str, Any]:
    """Model inputs for region rows in the prepared layout (views, RoIs, chosen t), plus what the output carries."""
    inputs = build_inputs(rows, images, cfg.views, cfg.image_size, job.views, prepared_size=prepared_size)
    n = len(rows)
    return {**{k: np.full(n, v) for k, v in base.items()},
            "image_id": _column([r["image_id"] for r in rows]), "region_id": _column(inputs.region_ids),
            "box": np.array([r["box"] for r in rows], dtype=np.float64).reshape(n, 4),
            "score": np.array([np.nan if r.get("score") is None else r["score"] for r in rows], dtype=np.float64),
            "detection_category_id": _column([r.get("detection_category_id") for r in rows]),
            "views": inputs.region_views(), "rois": inputs.rois, "ts": inputs.ts, "error": _column([""] * n),
            "reason": _column([None] * n)}


def error_batch(errors: Sequence[dict[str, Any]], cfg: DynReferConfig, base: dict[str, Any]) -> dict[str, Any]:
    """Rows that reach no model: ``{"image_id", "region_id", "reason", "message"}`` each, with a box when one is
    known.

    A row with an empty message is an image without regions: it only tells the driver the image is done."""
    n, v, size = len(errors), cfg.views.num_views, cfg.image_size
    return {**{k: np.full(n, v) for k, v in base.items()},
            "image_id": _column([e["image_id"] for e in errors]),
            "region_id": _column([e["region_id"] for e in errors]),
            "box": np.array([e.get("box") or [np.nan] * 4 for e in errors], dtype=np.float64).reshape(n, 4),
            "score": np.array([np.nan if e.get("score") is None else e["score"] for e in errors], dtype=np.float64),
            "detection_category_id": _column([e.get("detection_category_id") for e in errors]),
            "views": np.zeros((n, v, size, size, 3), dtype=np.uint8), "rois": np.zeros((n, v, 4), dtype=np.float32),
            "ts": np.zeros((n, v), dtype=np.float32), "error": _column([e["message"] for e in errors]),
            "reason": _column([e.get("reason") for e in errors])}


def shard_inputs(shard: int, job: CaptionJob, cfg: DynReferConfig, prepared_size: int | None
                 ) -> Iterator[dict[str, Any]]:
    """Model-input batches for one prepared shard; regions whose image cannot be read come out as error rows."""
    so = job.storage_options or None
    fs, path = storage.filesystem(storage.join(job.prepared, "regions", shard_name(shard)), so)
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    if job.split is not None:
        rows = [r for r in rows if r.get("split") == job.split]
    if not rows:  # nothing of the split here: one row that reaches no model marks the shard done
        yield error_batch([{"image_id": None, "region_id": None, "reason": None, "message": ""}], cfg,
                          {"shard": shard, "shard_total": 1})
    base = {"shard": shard, "shard_total": len(rows)}
    for start in range(0, len(rows), job.batch_size):
        chunk = rows[start: start + job.batch_size]
        images, failed = {}, {}
        for file in dict.fromkeys(r["file"] for r in chunk):
            try:
                images.update(load_images([file], so))
            except ImageError as e:
                failed[file] = (e.reason, str(e))
            except FileNotFoundError as e:
                failed[file] = ("missing", f"{file}: file not found ({e})")
            except OSError as e:
                failed[file] = ("read_error", f"{file}: {e}")
        good = [r for r in chunk if r["file"] not in failed]
        if good:
            yield input_batch(good, images, cfg, job, prepared_size, base)
        bad = [{**r, "reason": failed[r["file"]][0], "message": failed[r["file"]][1]} for r in chunk
               if r["file"] in failed]
        if bad:
            yield error_batch(bad, cfg, base)


def image_shard_inputs(shard: int, records: list[dict[str, Any]], errors: list[dict[str, Any]], job: CaptionJob,
                       cfg: DynReferConfig) -> Iterator[dict[str, Any]]:
    """Model-input batches for one shard of images with their boxes, through the prepare stage's per-image code;
    every image yields its region rows, its error rows, or one row saying it has no region."""
    so = job.storage_options or None
    prep = view_config(cfg)
    rows, images = [], {}
    errors = list(errors)
    for record in records:
        scored = {r["region_id"]: r for r in record["regions"]}
        if "error" in record:
            found, failed = [], preprocess_image(record, None, prep)[1]
        else:
            try:
                image, failed = decode_record(record, read_image_bytes(record["file"], so), prep)
            except OSError as e:
                image, failed = None, [error_row(record, r, "read", "read_error", str(e))
                                       for r in record["regions"] or [None]]
            found, bad_boxes = region_rows(record, image, prep) if image is not None else ([], [])
            failed += bad_boxes
            if image is not None and found:
                images[record["file"]] = image
        for row in found:
            row.update({k: scored[row["region_id"]][k] for k in ("score", "detection_category_id")})
        rows += found
        errors += [{**scored.get(e["region_id"] or "", {}), "image_id": e["image_id"], "region_id": e["region_id"],
                    "reason": e["reason"], "message": e["message"]} for e in failed]
        if not found and not failed:
            errors.append({"image_id": record["image_id"], "region_id": None, "reason": None, "message": ""})
    base = {"shard": shard, "shard_total": len(rows) + len(errors)}
    for start in range(0, len(rows), job.batch_size):
        yield input_batch(rows[start: start + job.batch_size], images, cfg, job, cfg.image_size, base)
    if errors:
        yield error_batch(errors, cfg, base)


class ShardInputs:
    """Ray Data CPU stage: a thin callable around :func:`shard_inputs` or :func:`image_shard_inputs`."""

    def __init__(self, job: dict[str, Any]):
        self.job = _build(CaptionJob, job, "job")
        self.cfg = model_config(self.job)
        self.prepared_size = None
        if not self.job.dense:
            manifest = storage.read_json(storage.join(self.job.prepared, "manifest.json"),
                                         self.job.storage_options or None)
            self.prepared_size = manifest["prepare"]["view_size"]

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        for i, shard in enumerate(batch["shard"]):
            if self.job.dense:
                planned = read_plan(str(batch["plan"][i]), self.job.storage_options or None)
                records = json.loads(batch["records"][i]) if "records" in batch else planned["records"]
                yield from image_shard_inputs(int(shard), records, planned["errors"], self.job, self.cfg)
            else:
                yield from shard_inputs(int(shard), self.job, self.cfg, self.prepared_size)


# --- the model ----------------------------------------------------------------------------------------------------

def predict_batch(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Captions, tags, category and attributes for one batch of model inputs; every other column passes through,
    and rows with an error (or no region) reach no model. Score maps travel as JSON text."""
    import torch

    ok = np.array([not e and r is not None for e, r in zip(batch["error"], batch["region_id"])], dtype=bool)
    n = len(ok)
    out = {k: v for k, v in batch.items() if k not in ("views", "rois", "ts")}
    out.update(caption=_column([""] * n), caption_score=np.full(n, np.nan), tags=_column([[]] * n),
               tag_scores=_column([[]] * n),
               category=_column([None] * n), category_score=np.full(n, np.nan), category_scores=_column([""] * n),
               attributes=_column([[]] * n), attribute_scores=_column([""] * n), view_ts=batch["ts"])
    if ok.any():
        device = next(model.parameters()).device
        views, view_index = share_views(batch["views"][ok])  # each distinct view encoded once
        preds = model.predict(torch.as_tensor(views).to(device), torch.as_tensor(view_index).to(device),
                              torch.as_tensor(batch["rois"][ok]).to(device))
        for i, p in zip(np.flatnonzero(ok), preds):
            out["caption"][i] = p.caption
            score = getattr(p, "caption_score", None)  # None until the model fills it
            out["caption_score"][i] = np.nan if score is None else float(score)
            out["tags"][i] = [t for t, _ in p.tags]
            out["tag_scores"][i] = [float(s) for _, s in p.tags]
            if p.recognition is not None:
                r = p.recognition
                out["category"][i] = r.category
                out["category_score"][i] = np.nan if r.category_score is None else r.category_score
                out["category_scores"][i] = json.dumps(r.category_scores)
                out["attributes"][i] = [a for a, _ in r.attributes]
                out["attribute_scores"][i] = json.dumps(r.attribute_scores)
    return out


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


# --- output -------------------------------------------------------------------------------------------------------

def _optional(value: Any) -> float | None:
    return None if value is None or math.isnan(float(value)) else float(value)


def _text(value: Any) -> str | None:
    """A string column's value; Ray Data may hand a column of nothing but None back as NaN."""
    return None if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)) else str(value)


def output_row(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row ``i`` of a predicted batch in the output schema (score maps as dicts, absent numbers as None)."""
    box = [float(v) for v in batch["box"][i]]
    return {
        "image_id": _text(batch["image_id"][i]), "region_id": _text(batch["region_id"][i]),
        "box": None if any(math.isnan(v) for v in box) else box, "score": _optional(batch["score"][i]),
        "detection_category_id": _text(batch["detection_category_id"][i]),
        "caption": str(batch["caption"][i]), "caption_score": _optional(batch["caption_score"][i]),
        "tags": list(batch["tags"][i]),
        "tag_scores": [float(v) for v in batch["tag_scores"][i]],
        "category": _text(batch["category"][i]), "category_score": _optional(batch["category_score"][i]),
        "category_scores": json.loads(batch["category_scores"][i]) if batch["category_scores"][i] else None,
        "attributes": list(batch["attributes"][i]),
        "attribute_scores": json.loads(batch["attribute_scores"][i]) if batch["attribute_scores"][i] else None,
        "view_ts": [float(v) for v in batch["view_ts"][i]], "error": _text(batch["error"][i]) or None,
        "reason": _text(batch["reason"][i]) if _text(batch["error"][i]) else None,
    }


def encode(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def output_name(shard: int, fmt: str) -> str:
    return shard_name(shard).replace(".parquet", ".jsonl" if fmt == "jsonl" else ".parquet")


# --- the job ------------------------------------------------------------------------------------------------------

def plan_uri(job: CaptionJob, shard: int) -> str:
    return storage.join(job.out, "plan", shard_name(shard).replace(".parquet", ".json.gz"))


def read_plan(uri: str, storage_options: storage.StorageOptions | None) -> dict[str, Any]:
    """A dense shard's plan: ``{"records": [...], "errors": [...]}``."""
    return json.loads(gzip.decompress(storage.read_bytes(uri, storage_options)))


def plan(job: CaptionJob, done: set[str] | frozenset[str] = frozenset(),
         ready: Callable[[], None] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(number of input images, one work item per shard); the same inputs give the same shards on every run.

    Prepared input: one item per prepared shard. Images: shards of ``images_per_shard`` images in reading order;
    each shard not in ``done`` (output names) has its records (and detections' boxes) and the error rows of the
    detections it owns (those naming no known image go to shard 0) written to ``out/plan/shard-NNNNN.json.gz``,
    and its item carries that file's URI, so that work items (held by the driver and Ray) stay small. ``ready``
    is called once the inputs are read and usable, before anything is written (a planning error writes nothing)."""
    so = job.storage_options or None
    if not job.dense:
        shards = sorted(int(n[6:11]) for n in storage.listdir(storage.join(job.prepared, "regions"), so)
                        if n.startswith("shard-"))
        if ready is not None:
            ready()
        return 0, [{"shard": s} for s in shards]
    records = image_records(job.images, job.split, job.image_root, so)
    errors: list[dict[str, Any]] = []
    if job.detections is not None:
        try:
            entries = datasets.iter_json_array(job.detections, so)
            errors = attach_detections(records, entries, job.detections, job.min_score, job.max_regions)
        except ValueError as e:
            if "expected a list" not in str(e):
                raise
            raise ValueError(f"{job.detections}: expected a JSON list of detections ({e})") from None
    num_shards = math.ceil(len(records) / job.images_per_shard)
    shard_of = {r["image_id"]: i // job.images_per_shard for i, r in enumerate(records)}
    shard_errors: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in errors:
        shard_errors[shard_of.get(e["image_id"], 0)].append(e)
    del shard_of, errors
    if ready is not None:
        ready()
    items = []
    for s in range(num_shards):
        if output_name(s, job.format) not in done:
            body = {"records": records[s * job.images_per_shard: (s + 1) * job.images_per_shard],
                    "errors": shard_errors.get(s, [])}
            storage.write_bytes(plan_uri(job, s), gzip.compress(json.dumps(body).encode(), compresslevel=1), so)
        items.append({"shard": s, "plan": plan_uri(job, s)})
    return len(records), items


def check_manifest(job: CaptionJob) -> None:
    """A rerun must caption the same inputs the same way into the same place."""
    so = job.storage_options or None
    keys = ("model", "prepared", "images", "image_root", "proposals", "detections", "min_score", "max_regions",
            "images_per_shard", "split", "views", "format")
    manifest = {k: getattr(job, k) for k in keys}
    uri = storage.join(job.out, "manifest.json")
    if storage.exists(uri, so) and storage.read_json(uri, so) != manifest:
        raise ValueError(f"{job.out} holds captions of a different job ({uri}); use a new out directory")
    storage.write_json(uri, manifest, so)


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
        ds = ds.map_batches(CaptionModel, fn_constructor_kwargs={"job": spec}, batch_size=job.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=job.cpus_per_actor,
                            num_gpus=job.gpus_per_actor, **({"resources": dict(job.actor_resources)}
                                                            if job.actor_resources else {}))
        pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
        with tqdm(unit="region", desc="caption", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(batch["image_id"])):
                    shard = int(batch["shard"][i])
                    pending[shard].append(output_row(batch, i))
                    if len(pending[shard]) == int(batch["shard_total"][i]):
                        rows = sorted((r for r in pending.pop(shard) if r["region_id"] is not None or r["error"]),
                                      key=lambda r: (r["image_id"] or "", r["region_id"] or ""))
                        storage.write_bytes(storage.join(job.out, "captions", output_name(shard, job.format)),
                                            encode(rows, job.format), so)
                        if job.dense:  # written: the shard's plan is no longer needed
                            fs, path = storage.filesystem(plan_uri(job, shard), so)
                            try:
                                fs.rm(path)
                            except OSError:
                                pass
                bar.update(len(batch["image_id"]))
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
    """Every caption row written under ``out`` (score maps as dicts)."""
    rows: list[dict[str, Any]] = []
    for name in storage.listdir(storage.join(out, "captions"), storage_options):
        data = storage.read_bytes(storage.join(out, "captions", name), storage_options)
        if name.endswith(".jsonl"):
            rows.extend(json.loads(line) for line in data.decode().splitlines() if line.strip())
        elif name.endswith(".parquet"):
            for row in pq.read_table(io.BytesIO(data)).to_pylist():
                for key in ("category_scores", "attribute_scores"):
                    if row.get(key) is not None:
                        row[key] = dict(row[key])
                rows.append(row)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model directory (local or s3://)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prepared", help="regions with boxes: the prepare stage's output directory")
    source.add_argument("--images", help="dense captioning: a Visual Genome root, a COCO JSON with 'images', a .txt "
                                         "list of image URIs, or a directory of images")
    boxes = p.add_mutually_exclusive_group()
    boxes.add_argument("--proposals", help="dense: exported proposal model directory")
    boxes.add_argument("--detections", help="dense: COCO-format detections JSON [{image_id, bbox: [x, y, w, h], "
                                            "score, category_id?}]; image_id as --images names them")
    p.add_argument("--image-root", help="with a COCO JSON as --images: folder of its file_names (default: its own)")
    p.add_argument("--min-score", type=float, default=0.0, help="dense: drop proposals/detections scoring less")
    p.add_argument("--max-regions", type=int, default=50, help="dense: at most this many regions per image")
    p.add_argument("--images-per-shard", type=int, default=16, help="dense: images per output shard")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--split", help="only regions (or, with a VG root, images) of this split")
    p.add_argument("--views", default="phash", choices=["phash", "fixed"], help="view choice at inference")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=1, help="model replicas")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs each model replica reserves")
    p.add_argument("--actor-resources", type=json.loads, default={}, metavar="JSON",
                   help='custom Ray resources each model replica needs, e.g. \'{"a100": 1}\' to pin the replicas '
                        'to nodes started with `ray start --resources`')
    p.add_argument("--input-workers", type=int, default=1,
                   help="CPU actors decoding images and cutting views (keep the model replicas fed)")
    p.add_argument("--cpus-per-input-worker", type=float, default=1.0)
    p.add_argument("--proposers", type=int, default=1, help="proposal model replicas")
    p.add_argument("--gpus-per-proposer", type=float, default=0.0)
    p.add_argument("--cpus-per-proposer", type=float, default=1.0)
    p.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_args(p)
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    job = CaptionJob(model=args.model, prepared=args.prepared, images=args.images, image_root=args.image_root,
                     proposals=args.proposals, detections=args.detections, min_score=args.min_score,
                     max_regions=args.max_regions, images_per_shard=args.images_per_shard, out=args.out,
                     split=args.split, views=args.views, batch_size=args.batch_size, actors=args.actors,
                     gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                     actor_resources=args.actor_resources, input_workers=args.input_workers, cpus_per_input_worker=args.cpus_per_input_worker,
                     proposers=args.proposers, gpus_per_proposer=args.gpus_per_proposer,
                     cpus_per_proposer=args.cpus_per_proposer, format=args.format,
                     storage_options=storage_options_from_args(args))
    try:
        validate_job(job)
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
