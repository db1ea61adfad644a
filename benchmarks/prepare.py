"""Throughput and memory of the prepare stage, measured side by side in one run.

Prints regions/s of (a) the Ray Data stage on a local cluster, (b) a plain single-process loop doing the same
work (read, decode, views, pHASH), and (c) JPEG decoding alone; then the peak memory of the Ray job's processes
on a corpus 10x larger, which should stay about the same (streaming).

    .venv/bin/python benchmarks/prepare.py --images 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from dynrefer import datasets, storage, synth  # noqa: E402
from dynrefer.imageio import decode_image  # noqa: E402
from dynrefer.preprocess import PrepareConfig, preprocess_image  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="images in the corpus timed side by side")
    ap.add_argument("--view-size", type=int, default=64)
    ap.add_argument("--memory-scale", type=int, default=10, help="the larger corpus is this many times larger")
    args = ap.parse_args()

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
