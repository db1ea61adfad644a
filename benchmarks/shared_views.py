"""Shared-view encoding vs encoding each region's views separately, side by side in one run.

On synthetic images with at least ``--min-regions`` regions (one batch per image, as a serving request or a
batch-captioning chunk of one image), for pHASH and fixed view selection:

* how many of the views are shared (the same image box as another region's), so encoded once;
* the time to build the inputs (choose and cut the views) and encode them, shared vs separate, and the whole
  ``predict`` (tags, captions), with the ratios;
* where the time goes: cutting views, the CLIP encoder, RoI-Align + alignment + fusion + Q-former, the heads
  and the LM's generation;
* whether both ways give the same captions and tags.

"Separate" is what each region's views cost on their own: every region's boxes cut alone and all B x V views
encoded; "shared" is :func:`dynrefer.batching.build_inputs` and the model on its distinct views.

    .venv/bin/python benchmarks/shared_views.py --images 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from dynrefer.batching import ModelInputs, build_inputs, choose_views, region_boxes
from dynrefer.config import DynReferConfig, load_config
from dynrefer.model import DynRefer
from dynrefer.preprocess import PrepareConfig, region_rows
from dynrefer.synth import render_scene
from dynrefer.views import crop_views


def corpus(cfg: DynReferConfig, count: int, min_regions: int, seed: int) -> list[tuple[Image.Image, list[dict]]]:
    """``count`` synthetic images with at least ``min_regions`` regions each, with their prepared rows."""
    prep = PrepareConfig(view_size=cfg.image_size, candidate_ts=list(cfg.views.candidate_ts))
    out, image_id = [], 0
    while len(out) < count:
        image_id += 1
        image, objects = render_scene(seed, image_id)
        if len(objects) < min_regions:
            continue
        record = {"image_id": str(image_id), "file": f"synth-{image_id}",
                  "regions": [{"region_id": str(o["object_id"]), "box": o["box"]} for o in objects]}
        rows, errors = region_rows(record, image, prep)
        if errors:
            raise RuntimeError(f"image {image_id}: {errors[0]['message']}")
        out.append((image, rows))
    return out


def separate_inputs(rows: list[dict], image: Image.Image, cfg: DynReferConfig, mode: str) -> ModelInputs:
    """Every region's views cut on their own, one encoder row each: view_index is 0..B*V-1."""
    b, v = len(rows), cfg.views.num_views
    views = np.empty((b, v, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    rois = np.empty((b, v, 4), dtype=np.float32)
    for i, row in enumerate(rows):
        boxes, rois[i] = region_boxes(row, image.size, choose_views(row, cfg.views, mode), cfg.image_size,
                                      cfg.image_size)
        views[i] = crop_views(image, boxes, cfg.image_size)
    return ModelInputs(views=views.reshape(b * v, *views.shape[2:]), view_index=np.arange(b * v).reshape(b, v),
                       rois=rois, ts=np.zeros((b, v), np.float32), captions=[""] * b, tags=[[]] * b,
                       region_ids=[str(r["region_id"]) for r in rows])


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds ``fn`` takes: wall time on a GPU (synchronised); on CPU the CPU time of this process, since on a
    shared machine wall time mostly measures the other jobs."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, out
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def measure(model: DynRefer, data: list, mode: str, device: str, repeats: int) -> dict[str, Any]:
    """Seconds summed over the images (median over repeats, shared and separate interleaved) for each step."""
    cfg = model.cfg
    build = {"shared": lambda rows, image: build_inputs(rows, {rows[0]["file"]: image}, cfg.views, cfg.image_size,
                                                        mode, prepared_size=cfg.image_size),
             "separate": lambda rows, image: separate_inputs(rows, image, cfg, mode)}
    totals: dict[str, dict[str, float]] = {w: {} for w in build}
    rows_encoded = {w: 0 for w in build}
    same, regions = 0, 0
    for image, rows in data:
        runs: dict[str, dict[str, list[float]]] = {w: {} for w in build}
        preds: dict[str, list] = {}
        for _ in range(repeats):
            for way, make in build.items():
                t_build, inputs = timed(lambda: make(rows, image), device)
                x = tuple(torch.from_numpy(a).to(device) for a in (inputs.views, inputs.view_index, inputs.rois))
                t_encode, _ = timed(lambda: model.encoder(x[0]), device)
                t_embed, _ = timed(lambda: model.embedding(*x), device)
                t_predict, preds[way] = timed(lambda: model.predict(*x), device)
                for k, t in (("build", t_build), ("encode", t_encode), ("embed", t_embed), ("predict", t_predict)):
                    runs[way].setdefault(k, []).append(t)
        for way in build:
            rows_encoded[way] += len(build[way](rows, image).views)
            for k, ts in runs[way].items():
                totals[way][k] = totals[way].get(k, 0.0) + statistics.median(ts)
        same += sum(a.caption == b.caption and [t for t, _ in a.tags] == [t for t, _ in b.tags]
                    for a, b in zip(preds["shared"], preds["separate"]))
        regions += len(rows)
    return {"times": totals, "rows": rows_encoded, "same": same, "regions": regions}


def shared_fraction(data: list, cfg: DynReferConfig, mode: str) -> tuple[int, int]:
    """(views, distinct views) over the images, each image's regions one batch."""
    views = distinct = 0
    for image, rows in data:
        inputs = build_inputs(rows, {rows[0]["file"]: image}, cfg.views, cfg.image_size, mode,
                              prepared_size=cfg.image_size)
        views, distinct = views + inputs.view_index.size, distinct + len(inputs.views)
    return views, distinct


def report(mode: str, m: dict[str, Any]) -> None:
    sh, sep = m["times"]["shared"], m["times"]["separate"]
    views = m["rows"]["separate"]
    print(f"\n== {mode} selection: {m['regions']} regions, {views} views, {m['rows']['shared']} distinct "
          f"({1 - m['rows']['shared'] / views:.1%} shared); identical captions and tags: {m['same']}/{m['regions']}")
    rows = [("build inputs (choose + cut views)", "build"), ("encoder (CLIP)", "encode"),
            ("embedding (encoder + RoI/align/fuse/Q-former)", "embed"), ("predict (embedding + heads + LM)", "predict")]
    print(f"{'step (seconds, summed over the images)':<48}{'separate':>12}{'shared':>12}{'speed-up':>10}")
    for name, k in rows:
        print(f"{name:<48}{sep[k]:>12.3f}{sh[k]:>12.3f}{sep[k] / sh[k]:>9.2f}x")
    for name, a, b in (("build + encode", "build", "encode"), ("build + predict", "build", "predict")):
        s, h = sep[a] + sep[b], sh[a] + sh[b]
        print(f"{name:<48}{s:>12.3f}{h:>12.3f}{s / h:>9.2f}x")
    for way, t in (("separate", sep), ("shared", sh)):
        total = t["build"] + t["predict"]
        parts = {"cut views": t["build"], "encoder": t["encode"], "RoI/align/fuse/Q-former": t["embed"] - t["encode"],
                 "heads + LM generation": t["predict"] - t["embed"]}
        print(f"where build + predict goes ({way}): " + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="model config (random weights; sharing does not depend on them)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--min-regions", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (CPU time with several counts their spin-waiting too)")
    p.add_argument("--count-images", type=int, default=200,
                   help="images (any number of regions) to count shared views on, without the model")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    model = DynRefer(cfg).to(args.device).eval()
    data = corpus(cfg, args.images, args.min_regions, args.seed)
    print(f"model {args.config} ({cfg.image_size} px, {cfg.views.num_views} views, fixed_ts {cfg.views.fixed_ts}) on "
          f"{args.device}, torch threads {torch.get_num_threads()}; {len(data)} synthetic images, "
          f"{sum(len(r) for _, r in data)} regions (>= {args.min_regions} each), median of {args.repeats}")
    counted = corpus(cfg, args.count_images, 1, args.seed)
    for mode in ("phash", "fixed"):
        views, distinct = shared_fraction(counted, cfg, mode)
        print(f"{mode}: {views} views of {sum(len(r) for _, r in counted)} regions on {len(counted)} images, "
              f"{distinct} distinct: {1 - distinct / views:.1%} shared")
    with torch.inference_mode():
        warm = separate_inputs(data[0][1][:2], data[0][0], cfg, "fixed")
        model.predict(*(torch.from_numpy(a).to(args.device) for a in (warm.views, warm.view_index, warm.rois)))
        for mode in ("phash", "fixed"):
            report(mode, measure(model, data, mode, args.device, args.repeats))


if __name__ == "__main__":
    main()
