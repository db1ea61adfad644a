"""Throughput and memory of the prepare stage, measured side by side in one run.

Prints regions/s of (a) the Ray Data stage on a local cluster, (b) a plain single-process loop doing the same
work (read, decode, views, pHASH), and (c) JPEG decoding alone; then the peak memory of the Ray job's processes
on a corpus 10x larger, which should stay about the same (streaming).

With ``--annotations-only``: the driver's peak memory while it plans the prepare job over Visual-Genome-layout
annotations written as text (no pixels), at ``--regions`` and 10x as many; each size is planned by a fresh
process, whose peak RSS is reported. Streaming annotations and shard plan files keep it flat.

    .venv/bin/python benchmarks/prepare.py --images 200
    .venv/bin/python benchmarks/prepare.py --annotations-only --regions 540000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import psutil

from dynrefer import datasets, storage, synth
from dynrefer.imageio import decode_image
from dynrefer.preprocess import PrepareConfig, preprocess_image


class PeakRSS:
    """Samples the summed PSS of this driver and its process tree (the local Ray cluster it started).

    PSS splits shared pages (the object store's mapping) between processes, so the sum is not inflated.
    """

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            me = psutil.Process()
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


PHRASES = ("a small red circle left of a large blue square", "the striped green triangle", "a dotted yellow star",
           "large purple hexagon above a tiny orange circle", "the plain white square near the edge")
SHAPES = ("circle", "square", "triangle", "star", "hexagon")
ATTRIBUTES = ('"red","striped","small"', '"blue","plain","large"', '"green","dotted","tiny"')


def write_annotations(root: str, num_images: int, regions_per_image: int) -> int:
    """image_data.json, region_descriptions.json and attributes.json of a VG-layout corpus, as text, no pixels.

    Every region is also an object of attributes.json (as in the synthetic corpus), in the same image order.
    Returns the size of region_descriptions.json in bytes."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "image_data.json"), "w") as f:
        f.write("[" + ",".join(f'{{"image_id":{i},"url":"images/{i}.jpg","width":640,"height":480,'
                               f'"coco_id":null,"flickr_id":null}}' for i in range(1, num_images + 1)) + "]")
    with open(os.path.join(root, "region_descriptions.json"), "w") as regions, \
            open(os.path.join(root, "attributes.json"), "w") as attributes:
        regions.write("[")
        attributes.write("[")
        rid = 0
        for i in range(1, num_images + 1):
            rs, os_ = [], []
            for j in range(regions_per_image):
                rid += 1
                x, y, w, h = (rid * 7) % 600, (rid * 13) % 440, 8 + (rid * 3) % 200, 8 + (rid * 5) % 150
                rs.append(f'{{"region_id":{rid},"image_id":{i},"phrase":"{PHRASES[rid % 5]}",'
                          f'"x":{x},"y":{y},"width":{w},"height":{h}}}')
                os_.append(f'{{"object_id":{rid},"x":{x},"y":{y},"w":{w},"h":{h},"names":["{SHAPES[rid % 5]}"],'
                           f'"synsets":[],"attributes":[{ATTRIBUTES[rid % 3]}]}}')
            sep = "," if i > 1 else ""
            regions.write(f'{sep}{{"id":{i},"regions":[{",".join(rs)}]}}')
            attributes.write(f'{sep}{{"image_id":{i},"attributes":[{",".join(os_)}]}}')
        regions.write("]")
        attributes.write("]")
    return os.path.getsize(os.path.join(root, "region_descriptions.json"))


def plan_child(root: str, out: str) -> None:
    """Plan the prepare job of ``root`` (what the driver does before any worker starts) and print JSON with this
    process's peak RSS."""
    import json
    import resource

    from pipelines.prepare import PrepareJob, plan_shards

    t = time.perf_counter()
    plan = plan_shards(PrepareJob(dataset="vg", root=root, out=out, images_per_shard=64))
    print(json.dumps({"seconds": round(time.perf_counter() - t, 1), "shards": plan.shards, "images": plan.images,
                      "regions": plan.input_regions,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def annotations_only(regions: int, regions_per_image: int, scale: int) -> None:
    import json
    import shutil
    import subprocess

    work = tempfile.mkdtemp(prefix="dynrefer-bench-plan-")
    try:
        results = []
        for n in (regions, regions * scale):
            root = os.path.join(work, f"vg-{n}")
            t = time.perf_counter()
            size = write_annotations(root, n // regions_per_image, regions_per_image)
            written = time.perf_counter() - t
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--plan-child", root,
                                    os.path.join(work, f"out-{n}")], capture_output=True, text=True, check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{result['regions']:>9} regions ({result['images']} images, region_descriptions.json "
                  f"{size / 1e6:.0f} MB, written in {written:.0f}s): planned in {result['seconds']:.0f}s, "
                  f"{result['shards']} shards, driver peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
            shutil.rmtree(root)
            shutil.rmtree(os.path.join(work, f"out-{n}"))
        print(f"driver peak, {scale}x corpus / 1x corpus: {results[1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="images in the corpus timed side by side")
    ap.add_argument("--view-size", type=int, default=64)
    ap.add_argument("--memory-scale", type=int, default=10, help="the larger corpus is this many times larger")
    ap.add_argument("--annotations-only", action="store_true",
                    help="only the driver's planning memory over text annotations (no pixels, no Ray)")
    ap.add_argument("--regions", type=int, default=540_000, help="--annotations-only: regions of the smaller corpus")
    ap.add_argument("--regions-per-image", type=int, default=50)
    ap.add_argument("--plan-child", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan_child:
        return plan_child(*args.plan_child)
    if args.annotations_only:
        return annotations_only(args.regions, args.regions_per_image, args.memory_scale)

    import ray

    from pipelines.prepare import PrepareJob, run

    work = tempfile.mkdtemp(prefix="dynrefer-bench-")
    small, large = os.path.join(work, "small"), os.path.join(work, "large")
    synth.write_corpus(small, args.images, seed=1, progress=False)
    cfg = PrepareConfig(view_size=args.view_size)
    records = list(datasets.read_visual_genome(small))
    n_regions = sum(len(r["regions"]) for r in records)
    blobs = {r["file"]: storage.read_bytes(r["file"]) for r in records}

    t = time.perf_counter()
    for r in records:
        decode_image(blobs[r["file"]])
    decode_rate = n_regions / (time.perf_counter() - t)

    t = time.perf_counter()
    for r in records:
        preprocess_image(r, storage.read_bytes(r["file"]), cfg)
    loop_rate = n_regions / (time.perf_counter() - t)

    from pipelines.args import secure_ray_env

    secure_ray_env()  # token auth, the token in the project's cache
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    job = PrepareJob(dataset="vg", root=small, out=os.path.join(work, "out-small"), images_per_shard=16, prepare=cfg)
    run(job, progress=False)  # warm-up: actor start-up and imports
    job.out = os.path.join(work, "out-small-2")
    t = time.perf_counter()
    with PeakRSS() as mem_small:
        summary = run(job, progress=False)
    ray_rate = summary["regions"] / (time.perf_counter() - t)

    synth.write_corpus(large, args.images * args.memory_scale, seed=2, progress=False)
    job_large = PrepareJob(dataset="vg", root=large, out=os.path.join(work, "out-large"), images_per_shard=16,
                           prepare=cfg)
    with PeakRSS() as mem_large:
        big = run(job_large, progress=False)
    ray.shutdown()

    print(f"corpus: {args.images} images, {n_regions} regions, views {args.view_size}px, {os.cpu_count()} CPUs")
    print(f"JPEG decode alone          {decode_rate:9.1f} regions/s")
    print(f"single-process loop        {loop_rate:9.1f} regions/s")
    print(f"Ray Data stage             {ray_rate:9.1f} regions/s")
    print(f"peak PSS {args.images:>6} images       {mem_small.peak / 2**20:9.0f} MiB")
    print(f"peak PSS {args.images * args.memory_scale:>6} images       {mem_large.peak / 2**20:9.0f} MiB "
          f"({big['regions']} regions)")
    print(f"Ray stage vs loop: {ray_rate / loop_rate:.2f}x; decode share of loop time: {loop_rate / decode_rate:.2f}; "
          f"peak memory {args.memory_scale}x corpus / 1x corpus: {mem_large.peak / mem_small.peak:.2f}x")


if __name__ == "__main__":
    main()
