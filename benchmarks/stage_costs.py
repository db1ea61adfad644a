"""What one region costs in each stage: CPU seconds of the CPU stages and FLOPs of the model; the inputs of
cluster/scaling.md.

CPU stages at ``--view-size`` px, one process, measured in process time (so other jobs on a shared machine do not
count): prepare (decode, 11 view boxes, their pHASH codes), the training view stage (decode, crop 3 random
views), the inference view stage (decode, crop the 3 pHASH-chosen views). FLOPs per region of ``--model`` (random
weights; FLOPs do not depend on them): one training step (forward + backward, teacher-forced caption) on a real
batch of synthetic regions cut by ``dynrefer.batching``, counted by ``torch.utils.flop_counter`` on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stage_costs.py [--model base] [--images 40] [--batch 4]
    .venv/bin/python benchmarks/stage_costs.py --model paper --device meta --images 8 --skip-cpu
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import (
    FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count,
)

from dynrefer import datasets, storage, synth
from dynrefer.batching import ModelInputs, build_inputs, load_images, region_rng
from dynrefer.config import load_config
from dynrefer.imageio import decode_image
from dynrefer.model import DynRefer, parameter_counts
from dynrefer.preprocess import PrepareConfig, preprocess_image
from pipelines.prepare import PrepareJob, prepare_shard


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch counts the GPU attention kernels only; the CPU one does the same arithmetic."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def cpu_seconds(fn: Callable[[], object]) -> float:
    fn()  # warm-up
    start = time.process_time()
    fn()
    return time.process_time() - start


def corpus(work: str, images: int, size: int) -> tuple[list[dict], list[dict]]:
    """The synthetic corpus's image records and its prepared rows at ``size`` px."""
    root, out = os.path.join(work, "synth"), os.path.join(work, "prepared")
    synth.write_corpus(root, images, seed=3, progress=False)
    records = list(datasets.read_visual_genome(root))
    prepare_shard(0, records, PrepareJob(dataset="vg", root=root, out=out, prepare=PrepareConfig(view_size=size)))
    return records, pq.read_table(os.path.join(out, "regions")).to_pylist()


def batches(rows: list[dict], views, size: int, mode: str, batch: int, prepared_size: int) -> list[ModelInputs]:
    out = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        rngs = [region_rng(0, 0, r["region_id"]) for r in part] if mode == "train" else None
        out.append(build_inputs(part, load_images(r["file"] for r in part), views, size, mode, rngs,
                                prepared_size=prepared_size))
    return out


def cpu_stages(records: list[dict], rows: list[dict], views, size: int) -> None:
    blobs = {r["file"]: storage.read_bytes(r["file"]) for r in records}
    n = sum(len(r["regions"]) for r in records)
    shapes = np.array([decode_image(b).size for b in blobs.values()])
    cfg = PrepareConfig(view_size=size)
    stages = [
        ("JPEG decode", n, lambda: [decode_image(b) for b in blobs.values()]),
        ("prepare (11 views + pHASH)", n, lambda: [preprocess_image(r, blobs[r["file"]], cfg) for r in records]),
        (f"training view stage ({views.num_views} views)", len(rows), lambda: batches(rows, views, size, "train", 64, size)),
        (f"inference view stage ({views.num_views} pHASH views)", len(rows),
         lambda: batches(rows, views, size, "phash", 64, size)),
    ]
    print(f"CPU stages: {len(records)} images ({shapes[:, 0].mean():.0f}x{shapes[:, 1].mean():.0f} px mean), "
          f"{n} regions, views {size} px, one process")
    for name, count, fn in stages:
        s = cpu_seconds(fn)
        print(f"  {name:<38} {1e3 * s / count:7.2f} ms CPU/region {count / s:8.1f} regions/s per core")


def model_flops(name: str, rows: list[dict], batch: int, prepared_size: int, device: str) -> None:
    """On ``meta`` (shapes only, for models too large to run here) the language model is left out: its loss
    needs real values."""
    cfg = load_config(name)
    torch.backends.mha.set_fastpath_enabled(False)  # the fused inference kernel is invisible to the counter
    inputs = batches(rows[:batch], cfg.views, cfg.image_size, "train", batch, prepared_size)[0]
    with torch.device(device):
        model = DynRefer(cfg)
    total, trainable = parameter_counts(model)
    args = (torch.as_tensor(inputs.views).to(device), torch.as_tensor(inputs.view_index).to(device),
            torch.as_tensor(inputs.rois).to(device), inputs.captions, inputs.tags)
    b = len(inputs.captions)
    with FlopCounterMode(display=False) as encoder:
        model.embedding.encoder(args[0])
    with FlopCounterMode(display=False) as embedding:
        model.embedding(*args[:3])
    print(f"FLOPs: {name}, {total / 1e9:.2f}B parameters ({trainable / 1e6:.0f}M trainable), {b} regions x "
          f"{cfg.views.num_views} views ({len(inputs.views)} distinct views)")
    print(f"  encoder                        {encoder.get_total_flops() / len(inputs.views) / 1e9:8.1f} GFLOP per view")
    print(f"  views -> region queries        {embedding.get_total_flops() / b / 1e9:8.1f} GFLOP per region")
    if device == "meta":
        return
    with FlopCounterMode(display=False) as forward:
        losses = model(*args)
    with FlopCounterMode(display=False) as backward:
        losses["loss"].backward()
    for label, count in [("forward (all heads)", forward), ("backward", backward)]:
        print(f"  {label:<30} {count.get_total_flops() / b / 1e9:8.1f} GFLOP per region")
    step = (forward.get_total_flops() + backward.get_total_flops()) / b
    print(f"  training step                  {step / 1e9:8.1f} GFLOP per region")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="base", help="model config for the FLOP count (tiny, base, paper)")
    ap.add_argument("--images", type=int, default=40, help="synthetic images for the CPU stages")
    ap.add_argument("--view-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4, help="regions in the batch whose FLOPs are counted")
    ap.add_argument("--device", default="cpu", choices=["cpu", "meta"],
                    help="meta: count the encoder and the region embedding from shapes alone (no LM)")
    ap.add_argument("--skip-flops", action="store_true")
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="dynrefer-costs-")
    records, rows = corpus(work, args.images, args.view_size)
    if not args.skip_cpu:
        cpu_stages(records, rows, load_config(args.model).views, args.view_size)
    if not args.skip_flops:
        model_flops(args.model, rows, args.batch, args.view_size, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
