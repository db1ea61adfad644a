"""Batched perceptual hash vs a loop of ``imagehash.phash``, on one CPU core.

Builds DynRefer views (the region at t=0 and the ten candidates t=0.1..1.0, cropped and resized with
``dynrefer.views.crop_views``) from the photos that ship with scikit-image and scikit-learn, hashes them
with :func:`dynrefer.phash.phash_batch` and with ``imagehash.phash(Image.fromarray(view))`` one by one,
checks that the codes are identical and prints the times; the last line is the speed-up.

    .venv/bin/python benchmarks/phash.py --views 2000 --size 224 --repeats 3
"""

from __future__ import annotations

import os

# One core, set before numpy/scipy load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import imagehash  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from dynrefer.phash import phash_batch  # noqa: E402
from dynrefer.views import CANDIDATE_TS, crop_views, view_boxes  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def pin_to_one_core() -> str:
    """Run on a single CPU (Linux); returns which, for the report."""
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"cpu {cpu}"
    return "unpinned (no sched_setaffinity)"


def build_views(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` DynRefer views of ``size`` x ``size``: 11 per random region, over a few photos.  # (N, S, S, 3)"""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]
    images += [Image.fromarray(array) for array in load_sample_images().images]
    ts = (0.0,) + CANDIDATE_TS
    views = []
    total = 0
    while total < count:
        image = images[len(views) % len(images)]
        width, height = image.size
        x1, y1 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        box = [x1, y1, x1 + rng.uniform(8, width - x1), y1 + rng.uniform(8, height - y1)]
        views.append(crop_views(image, view_boxes(box, width, height, ts), size))
        total += len(ts)
    return np.concatenate(views)[:count]


def time_best(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=2000, help="number of views to hash (default 2000)")
    parser.add_argument("--size", type=int, default=224, help="side of each square view in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method; the best counts (default 3)")
    args = parser.parse_args()
    if args.views < 1 or args.size < 1 or args.repeats < 1:
        parser.error("--views, --size and --repeats must be positive")

    where = pin_to_one_core()
    views = build_views(args.views, args.size)
    print(f"{len(views)} views of {args.size}x{args.size} RGB from {len(PHOTOS) + 2} photos; {where}, 1 thread")

    def loop() -> list:
        return [imagehash.phash(Image.fromarray(view)) for view in views]

    with threadpool_limits(limits=1):
        phash_batch(views[:8])  # weights for this size, BLAS and FFT plans: set up once, as in a worker
        imagehash.phash(Image.fromarray(views[0]))
        t_batch, t_loop = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternate, so both see the same machine state
            seconds, hashes = time_best(loop, 1)
            t_loop = min(t_loop, seconds)
            seconds, codes = time_best(lambda: phash_batch(views), 1)
            t_batch = min(t_batch, seconds)

    expected = np.array([int(str(h), 16) for h in hashes], dtype=np.uint64)
    assert np.array_equal(codes, expected), f"{int((codes != expected).sum())} codes differ from imagehash"
    print(f"codes identical to imagehash.phash on all {len(views)} views")
    per_view = 1e6 / len(views)
    print(f"imagehash loop: {t_loop:.3f} s ({t_loop * per_view:.1f} us/view), best of {args.repeats}")
    print(f"phash_batch:    {t_batch:.3f} s ({t_batch * per_view:.1f} us/view), best of {args.repeats}")
    print(f"speed-up batched vs imagehash loop: {t_loop / t_batch:.1f}x")


if __name__ == "__main__":
    main()
