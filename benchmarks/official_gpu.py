"""The official model (configs/model/official.yaml) on one GPU: regions/s and peak memory of captioning and of a
training step, with random weights (speed and memory do not depend on their values; none are downloaded).

As the official code runs it: the frozen towers (EVA ViT-g, the text tower, Flan-T5-XL) held in bf16, the trainable
modules in fp32, the forward under bf16 autocast (RoI-Align and the deformable sampling run in fp32, as
torchvision's autocast rules cast them). The tag vocabulary has the RAM list's 4,585 entries and recognition 80
classes and 117 attributes, so the heads cost what they cost with the released files. Captioning is
``DynRefer.predict`` (tags, caption by beam search, category and attributes) on ``--batch-size`` regions of 3
distinct views each; training is one forward, backward and AdamW step over the trainable parameters. regions/s
counts the timed iterations after one warm-up; peak memory is ``torch.cuda.max_memory_allocated`` per phase.

    .venv/bin/python benchmarks/official_gpu.py [--batch-size 32] [--iters 3]       # needs CUDA, < 10 minutes
    .venv/bin/python benchmarks/official_gpu.py --device cpu --tiny                  # logic check on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from typing import Any


NUM_TAGS, NUM_CLASSES, NUM_ATTRIBUTES = 4585, 80, 117


def build(tiny: bool, device: Any):
    """The model of official.yaml (``tiny``: at small widths) with random weights on ``device``."""
    import torch

    from dynrefer.config import DynReferConfig, load_config
    from dynrefer.model import DynRefer

    cfg = load_config("official")
    scale = 20 if tiny else 1
    if tiny:  # official.yaml's structure at small widths (a ViT of width 128, 2-layer Q-former, T5 of width 128)
        data = cfg.to_dict()
        data["image_size"] = 64
        data["encoder"].update(name="official-tiny", model_cfg={
            "embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8,
                                             "head_width": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}})
        data["qformer"].update(num_queries=8, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
        data["language"]["arch"] = {"model_type": "t5", "d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2,
                                    "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
                                    "dense_act_fn": "gelu", "tie_word_embeddings": False}
        cfg = DynReferConfig.from_dict(data)
    cfg.tags.vocabulary = [f"tag{i}" for i in range(NUM_TAGS // scale)]
    cfg.recognition.categories = [f"class{i}" for i in range(NUM_CLASSES // scale)]
    cfg.recognition.attributes = [f"kind{i}:word{i}a/word{i}b" for i in range(NUM_ATTRIBUTES // scale)]
    with torch.device(device):
        model = DynRefer(cfg)
    return model.to(device)


def precision(model, device: Any, bf16: bool):
    """Frozen towers in bf16, the rest fp32; the autocast context the forward runs in."""
    import torch

    if not bf16:
        return contextlib.nullcontext
    model.encoder.clip.to(torch.bfloat16)
    model.language.lm.to(torch.bfloat16)
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def inputs(model, batch: int, device: Any, seed: int = 0) -> dict[str, Any]:
    """``batch`` regions of 3 distinct views each, random pixels and RoIs (in view pixels), captions and tags."""
    import torch

    from dynrefer import synth

    gen = torch.Generator().manual_seed(seed)
    s = model.cfg.image_size
    v = model.cfg.views.num_views
    views = torch.randint(0, 256, (batch * v, s, s, 3), generator=gen, dtype=torch.uint8)
    corner = torch.rand(batch, v, 2, generator=gen) * s / 2
    size = torch.rand(batch, v, 2, generator=gen) * s / 2 + 4
    rois = torch.cat([corner, (corner + size).clamp(max=s - 1)], dim=-1)
    rng = random.Random(seed)
    words = synth.vocabulary()
    captions = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(batch)]
    tags = [rng.sample(model.cfg.tags.vocabulary, 3) for _ in range(batch)]
    return {"views": views.to(device), "view_index": torch.arange(batch * v).view(batch, v).to(device),
            "rois": rois.to(device), "captions": captions, "tags": tags}


def timed(fn, iters: int, device: Any) -> tuple[float, float]:
    """(seconds per iteration after one warm-up, peak GPU bytes; 0 on CPU)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters, (torch.cuda.max_memory_allocated() if cuda else 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="official.yaml's structure at small widths (logic check)")
    ap.add_argument("--batch-size", type=int, default=32, help="regions per captioning call and per training step")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per phase (after one warm-up)")
    ap.add_argument("--fp32", action="store_true", help="no bf16 (the default on cpu)")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("official_gpu.py: no CUDA device here; it measures the official model on a GPU "
              "(use --device cpu --tiny to check its logic)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(args.tiny, args.device)
    bf16 = not args.fp32 and args.device == "cuda"  # bf16 autocast on GPU only, as the training configs
    autocast = precision(model, args.device, bf16)
    build_s = time.perf_counter() - t0
    batch = inputs(model, args.batch_size, args.device)
    model.eval()

    def caption() -> None:
        with autocast():
            model.predict(batch["views"], batch["view_index"], batch["rois"])

    caption_s, caption_peak = timed(caption, args.iters, args.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    losses: dict[str, float] = {}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(batch["views"], batch["view_index"], batch["rois"], batch["captions"], batch["tags"])
        out["loss"].backward()
        optimizer.step()
        losses.update({k: float(v.detach()) for k, v in out.items()})

    train_s, train_peak = timed(step, args.iters, args.device)
    figures = {
        "config": "official (tiny widths)" if args.tiny else "official",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "precision": "bf16 frozen towers + autocast" if bf16 else "fp32",
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "trainable": sum(p.numel() for p in trainable), "build_s": round(build_s, 1),
        "batch_size": args.batch_size, "caption_regions_per_s": round(args.batch_size / caption_s, 2),
        "caption_peak_gib": round(caption_peak / 2 ** 30, 2),
        "train_regions_per_s": round(args.batch_size / train_s, 2), "train_peak_gib": round(train_peak / 2 ** 30, 2),
        "losses": {k: round(v, 4) for k, v in losses.items()},
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
