"""Training throughput, measured side by side in one run: DeepSpeed ZeRO-2 vs plain DDP, and 2 workers vs 1.

Each variant is a real ``pipelines.train`` run (Ray Train, Ray Data input, the tiny model) on the same prepared
corpus; its samples/s counts every step after two warm-up steps, data waits included, evaluation excluded.
Without ``--prepared``, the built-in synthetic corpus is generated and prepared first.

    .venv/bin/python benchmarks/train.py [--prepared DIR] [--steps 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time


from dynrefer.paths import REPO_ROOT as REPO  # noqa: E402
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))

from pipelines.args import secure_ray_env  # noqa: E402
from pipelines.train import run  # noqa: E402
from pipelines.train_job import EvalSection, TrainJob  # noqa: E402


def prepare_synthetic(base: str, images: int) -> str:
    """The synthetic corpus, prepared by the prepare stage with configs/prepare/synthetic.yaml."""
    from dynrefer import synth
    from pipelines.prepare import PrepareJob
    from pipelines.prepare import run as prepare

    root, out = os.path.join(base, "synth"), os.path.join(base, "prepared")
    synth.write_corpus(root, images, seed=0, progress=False)
    prepare(PrepareJob.from_yaml(os.path.join(REPO, "configs", "prepare", "synthetic.yaml"), root=root, out=out),
            progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "train", "tiny.yaml"))
    ap.add_argument("--prepared", help="a prepare-stage output (default: generate and prepare a synthetic corpus)")
    ap.add_argument("--images", type=int, default=120, help="synthetic images when --prepared is not given")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    args = ap.parse_args()

    import ray

    secure_ray_env()
    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="dynrefer-bench-") as base:
        prepared = args.prepared or prepare_synthetic(base, args.images)
        job = TrainJob.from_yaml(args.config)
        job = dataclasses.replace(
            job, data=dataclasses.replace(job.data, prepared=[os.path.abspath(prepared)]), max_steps=args.steps,
            checkpoint_every=args.steps, eval=EvalSection(every=-1), storage_path=os.path.join(base, "runs"),
            max_failures=0, model_overrides={}, init_from=None)  # speed only: a random model costs the same
        variants = [
            ("DeepSpeed ZeRO-2, 2 workers", dict(ddp=False, deepspeed="configs/deepspeed/zero2.json", workers=2)),
            ("plain DDP, 2 workers", dict(ddp=True, workers=2)),
            ("DeepSpeed ZeRO-2, 1 worker", dict(ddp=False, deepspeed="configs/deepspeed/zero2.json", workers=1)),
        ]
        rates = {}
        for name, v in variants:
            start = time.perf_counter()
            variant = dataclasses.replace(job, ddp=v["ddp"], deepspeed=v.get("deepspeed", job.deepspeed),
                                          workers=dataclasses.replace(job.workers, num=v["workers"]),
                                          name=name.replace(" ", "-").replace(",", ""))
            out = run(variant)
            rates[name] = out["metrics"]["throughput"]
            print(f"{name:<30} {rates[name]:8.1f} samples/s   (loss {out['metrics']['loss']:.3f}, "
                  f"run {time.perf_counter() - start:.0f} s)", flush=True)
    ray.shutdown()
    print(f"batch {job.batch_size} regions per worker, {args.steps} steps, {os.cpu_count()} CPUs")
    print(f"ZeRO-2 / DDP (2 workers):    {rates['DeepSpeed ZeRO-2, 2 workers'] / rates['plain DDP, 2 workers']:.2f}x")
    print(f"2 workers / 1 (ZeRO-2):      "
          f"{rates['DeepSpeed ZeRO-2, 2 workers'] / rates['DeepSpeed ZeRO-2, 1 worker']:.2f}x")


if __name__ == "__main__":
    main()
