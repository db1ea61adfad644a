"""Model inputs from prepared region rows: which views each region gets, their pixels and RoIs, collated.

Training, batch captioning and serving all build their batches here, so they agree on view choice, crops and
RoIs. A prepared row (see ``pipelines/prepare.py``) carries ``ts`` (t=0 first, then the candidates),
``view_boxes`` and ``phash`` per t, the clipped region ``box``, ``file``, ``caption`` and ``tags``. View boxes
and RoIs always come from :mod:`dynrefer.views`; nothing here re-derives view geometry.

A view several regions of one image use (the same box: always the t=1 view) is cut once and encoded once:
:class:`ModelInputs` holds each distinct view once and indexes it per region. This is exact; it never
changes which views a region gets.

View choice per region (indices into the row's ``ts``, t=0 first):

* ``train``: t=0 plus ``n - 1`` candidates drawn without replacement, afresh each time the region is seen, in the
  order drawn;
* ``phash``: t=0 plus the greedy pHASH choice of :func:`dynrefer.phash.select_views`, best first;
* ``fixed``: the available t nearest to each of the config's ``fixed_ts``, in that order.

Views reach the model in that order (it matters: the fusion MLP reads them view by view), as in the official code.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from dynrefer import storage
from dynrefer.config import ViewConfig
from dynrefer.imageio import decode_image
from dynrefer.phash import select_views
from dynrefer.views import crop_unique_views, region_in_views

MODES = ("train", "phash", "fixed")


@dataclass
class ModelInputs:
    """A collated batch: what :meth:`dynrefer.model.DynRefer.forward` and ``predict`` take, plus bookkeeping.

    A view several regions use (same pixels: the t=1 view of one image, say) is held, and encoded, once.
    """

    views: np.ndarray  # (N, S, S, 3) uint8, each distinct view once
    view_index: np.ndarray  # (B, V) int64, the row of ``views`` each region's view is
    rois: np.ndarray  # (B, V, 4) float32, the region in each view's S x S frame
    ts: np.ndarray  # (B, V) float32, the t of each chosen view
    captions: list[str]
    tags: list[list[str]]
    region_ids: list[str]
    view_boxes: np.ndarray | None = None  # (B, V, 4) int64, each chosen view's crop box in image pixels

    def __len__(self) -> int:
        return len(self.region_ids)

    def to_tensors(self, device: Any = "cpu") -> tuple[Any, Any, Any]:
        """views (N, S, S, 3) uint8, view_index (B, V) int64 and rois (B, V, 4) float32 as tensors on ``device``:
        the model's ``forward``/``predict`` inputs. Read-only arrays (Ray Data's) are copied, as torch needs
        writable ones."""
        import torch

        arrays = (np.require(a, requirements="W") for a in (self.views, self.view_index, self.rois))
        return tuple(torch.from_numpy(a).to(device) for a in arrays)

    def region_views(self) -> np.ndarray:
        """Each region's own views.  # (B, V, S, S, 3) uint8"""
        return self.views[self.view_index]

    def to_columns(self) -> dict[str, np.ndarray]:
        """Column form for a Ray Data batch (one entry per region, so each carries its views' pixels)."""
        tags = np.empty(len(self), dtype=object)
        tags[:] = [list(t) for t in self.tags]
        return {"views": self.region_views(), "rois": self.rois, "ts": self.ts,
                "caption": np.array(self.captions, dtype=object), "tags": tags,
                "region_id": np.array(self.region_ids, dtype=object)}

    @classmethod
    def from_columns(cls, batch: Mapping[str, Any]) -> "ModelInputs":
        """Inverse of :meth:`to_columns`, for a batch as Ray Data's ``iter_batches`` returns it; views that are
        the same pixels are shared again."""
        views, view_index = share_views(np.asarray(batch["views"], dtype=np.uint8))
        return cls(views=views, view_index=view_index, rois=np.asarray(batch["rois"], dtype=np.float32),
                   ts=np.asarray(batch["ts"], dtype=np.float32), captions=[str(c) for c in batch["caption"]],
                   tags=[[str(t) for t in tags] for tags in batch["tags"]],
                   region_ids=[str(r) for r in batch["region_id"]])


    def to_bytes(self) -> bytes:
        """The whole batch as one uncompressed ``.npz`` blob, each distinct view once: what one Ray Data row
        carries where a column per region would repeat every shared view's pixels."""
        buf = io.BytesIO()
        arrays = {"views": self.views, "view_index": self.view_index, "rois": self.rois, "ts": self.ts,
                  "captions": np.array(self.captions, dtype=str), "tags": np.array(json.dumps(self.tags)),
                  "region_ids": np.array(self.region_ids, dtype=str)}
        if self.view_boxes is not None:
            arrays["view_boxes"] = self.view_boxes
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ModelInputs":
        """Inverse of :meth:`to_bytes` (writable arrays, as torch needs)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(views=z["views"], view_index=z["view_index"], rois=z["rois"], ts=z["ts"],
                       captions=[str(c) for c in z["captions"]], tags=json.loads(str(z["tags"])),
                       region_ids=[str(r) for r in z["region_ids"]],
                       view_boxes=z["view_boxes"] if "view_boxes" in z.files else None)


def share_views(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region views (B, V, S, S, 3) as each distinct one once (N, S, S, 3) plus the index (B, V) into them.

    Distinct means distinct pixels, so encoding the shared views gives every region exactly the features its own
    views would. Views are bucketed by a sample of about 4096 of their bytes and confirmed equal in full, which
    costs microseconds per view. First occurrences keep their order.
    """
    views = np.asarray(views, dtype=np.uint8)
    flat = views.reshape(-1, *views.shape[-3:])  # (B*V, S, S, 3)
    stride = max(1, flat[0].size // 4096) if len(flat) else 1
    first: dict[bytes, list[int]] = {}
    index = np.empty(len(flat), dtype=np.int64)
    kept: list[int] = []
    for i, view in enumerate(flat):
        same = first.setdefault(view.reshape(-1)[::stride].tobytes(), [])
        match = next((j for j in same if np.array_equal(flat[kept[j]], view)), None)
        if match is None:
            match = len(kept)
            same.append(match)
            kept.append(i)
        index[i] = match
    return flat[kept], index.reshape(views.shape[:-3])


def concat_views(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Join several batches' (views (N_i, S, S, 3), view_index (B_i, V)) into one, offsetting each index."""
    offsets = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    return (np.concatenate([v for v, _ in parts]),
            np.concatenate([index + offset for (_, index), offset in zip(parts, offsets)]))


def take_regions(views: np.ndarray, view_index: np.ndarray, regions: slice | np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The views (N', S, S, 3) that ``view_index[regions]`` uses, and that index (B', V) renumbered into them."""
    used, index = np.unique(view_index[regions], return_inverse=True)
    return views[used], index.reshape(view_index[regions].shape)


def region_rng(seed: int, sighting: int, region_id: str) -> np.random.Generator:
    """A generator for one sighting of one region: reproducible for a seed, different for every sighting.

    ``sighting`` tells the times a region is seen apart: the epoch, or a number the data pipeline draws
    afresh every epoch (Ray Data's ``random`` expression with ``reseed_after_execution``).
    """
    return np.random.default_rng([seed, sighting, zlib.crc32(str(region_id).encode())])


def _row_ts(row: Mapping[str, Any]) -> np.ndarray:
    ts = np.asarray(row["ts"], dtype=np.float64)
    if ts.ndim != 1 or len(ts) == 0 or ts[0] != 0.0:
        raise ValueError(f"region {row.get('region_id')}: prepared ts must start with t=0, got {ts.tolist()}")
    return ts


def nearest_indices(available: Sequence[float], wanted: Sequence[float]) -> list[int]:
    """For each wanted t, the index of the nearest available t (the smaller one on a tie)."""
    a = np.asarray(available, dtype=np.float64)
    return [int(np.argmin(np.abs(a - t) + 1e-9 * a)) for t in wanted]


def candidate_indices(ts: Sequence[float], candidate_ts: Sequence[float]) -> list[int]:
    """Indices (never 0) of the available views nearest the model's candidate t, sorted by t, without repeats."""
    ts = np.asarray(ts, dtype=np.float64)
    others = np.arange(1, len(ts))
    if not len(others):
        return []
    picked = {int(others[i]) for i in nearest_indices(ts[1:], candidate_ts)}
    return sorted(picked, key=lambda i: (ts[i], i))


def train_views(ts: Sequence[float], cfg: ViewConfig, rng: np.random.Generator) -> list[int]:
    """t=0 plus ``num_views - 1`` candidates drawn at random without replacement, in the order drawn."""
    candidates = candidate_indices(ts, cfg.candidate_ts)
    if cfg.num_views - 1 > len(candidates):
        raise ValueError(f"{cfg.num_views} views need {cfg.num_views - 1} candidates besides t=0, "
                         f"the prepared rows offer {len(candidates)}")
    drawn = rng.choice(candidates, size=cfg.num_views - 1, replace=False) if cfg.num_views > 1 else []
    return [0, *(int(i) for i in drawn)]


def phash_views(ts: Sequence[float], codes: Sequence[int], cfg: ViewConfig) -> list[int]:
    """t=0 plus the candidates :func:`dynrefer.phash.select_views` picks from their pHASH codes."""
    candidates = candidate_indices(ts, cfg.candidate_ts)
    pool = [0, *candidates]
    t = np.asarray(ts, dtype=np.float64)[pool]
    chosen = select_views(np.asarray(codes, dtype=np.uint64)[pool], t, cfg.num_views)
    return [pool[i] for i in chosen]


def fixed_views(ts: Sequence[float], cfg: ViewConfig) -> list[int]:
    """The available view nearest each of ``cfg.fixed_ts`` (one per model view). Several views need t=0 first: it
    is the one the others are aligned to; a single view may be any t (the full-image RoI-Align baseline is t=1)."""
    if len(cfg.fixed_ts) != cfg.num_views or (cfg.num_views > 1 and cfg.fixed_ts[0] != 0.0):
        raise ValueError(f"views.fixed_ts {cfg.fixed_ts} must hold num_views={cfg.num_views} values, 0.0 first "
                         f"when there are several")
    return nearest_indices(ts, cfg.fixed_ts)


def choose_views(row: Mapping[str, Any], cfg: ViewConfig, mode: str,
                 rng: np.random.Generator | None = None) -> list[int]:
    """View indices into ``row["ts"]`` for one region, by ``mode`` (one of :data:`MODES`)."""
    ts = _row_ts(row)
    if mode == "train":
        if rng is None:
            raise ValueError("training view choice draws at random: pass a numpy Generator")
        return train_views(ts, cfg, rng)
    if mode == "phash":
        codes = row.get("phash")
        if codes is None or len(codes) != len(ts):
            raise ValueError(f"region {row.get('region_id')}: pHASH selection needs one code per prepared view")
        return phash_views(ts, codes, cfg)
    if mode == "fixed":
        return fixed_views(ts, cfg)
    raise ValueError(f"view mode must be one of {MODES}, got {mode!r}")


def load_images(files: Iterable[str], storage_options: storage.StorageOptions | None = None,
                max_pixels: int = 64_000_000) -> dict[str, Image.Image]:
    """Decode every distinct file once: regions of one image share its decoded pixels."""
    images: dict[str, Image.Image] = {}
    for file in files:
        if file not in images:
            images[file] = decode_image(storage.read_bytes(file, storage_options), max_pixels=max_pixels, name=file)
    return images


def region_boxes(row: Mapping[str, Any], image_size: tuple[int, int], indices: Sequence[int], size: int,
                 prepared_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The chosen views' boxes in the image (V, 4) int64 and the region's RoI in each (V, 4) float32.

    Stored RoIs are used when the rows were prepared at ``size`` (``prepared_size``); otherwise they are
    recomputed for ``size`` with :func:`dynrefer.views.region_in_views`.
    """
    width, height = image_size
    if (row.get("width"), row.get("height")) not in ((width, height), (None, None)):
        raise ValueError(f"{row.get('file')}: decoded image is {width}x{height}, the prepared rows say "
                         f"{row.get('width')}x{row.get('height')}; prepare the data again")
    boxes = np.asarray(row["view_boxes"], dtype=np.int64).reshape(-1, 4)[list(indices)]  # (V, 4)
    if prepared_size == size:
        rois = np.asarray(row["rois"], dtype=np.float64).reshape(-1, 4)[list(indices)]
    else:
        rois = region_in_views(np.asarray(row["box"], dtype=np.float64), boxes, size)
    return boxes, rois.astype(np.float32)


def build_inputs(rows: Sequence[Mapping[str, Any]], images: Mapping[str, Image.Image], cfg: ViewConfig, size: int,
                 mode: str, rngs: Sequence[np.random.Generator] | None = None,
                 prepared_size: int | None = None) -> ModelInputs:
    """Choose, crop and collate the views of every row; ``rngs`` holds one generator per row in ``train`` mode.

    Each image's views are cut once per distinct box, however many regions choose that box.
    """
    if mode == "train" and (rngs is None or len(rngs) != len(rows)):
        raise ValueError("training batches need one numpy Generator per row")
    b, v = len(rows), cfg.num_views
    boxes = np.empty((b, v, 4), dtype=np.int64)
    rois = np.empty((b, v, 4), dtype=np.float32)
    ts = np.empty((b, v), dtype=np.float32)
    for i, row in enumerate(rows):
        indices = choose_views(row, cfg, mode, rngs[i] if rngs is not None else None)
        boxes[i], rois[i] = region_boxes(row, images[row["file"]].size, indices, size, prepared_size)
        ts[i] = np.asarray(row["ts"], dtype=np.float32)[indices]
    by_file: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_file.setdefault(row["file"], []).append(i)
    parts = [np.empty((0, size, size, 3), dtype=np.uint8)]
    view_index = np.empty((b, v), dtype=np.int64)
    for file, of_file in by_file.items():
        views, index = crop_unique_views(images[file], boxes[of_file], size)  # (N_f, S, S, 3), (B_f*V,)
        view_index[of_file] = index.reshape(len(of_file), v) + sum(len(p) for p in parts)
        parts.append(views)
    views = np.concatenate(parts)
    return ModelInputs(views=views, view_index=view_index, rois=rois, ts=ts, view_boxes=boxes,
                       captions=[str(r.get("caption") or "") for r in rows],
                       tags=[[str(t) for t in (r.get("tags") if r.get("tags") is not None else [])] for r in rows],
                       region_ids=[str(r.get("region_id")) for r in rows])


def rows_from_columns(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A columnar batch (Ray Data's numpy format, or lists) as one dict per row."""
    names = list(batch)
    if not names:
        return []
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]
