"""What the frozen encoder can tell: linear-probe accuracy for shape, colour, pattern and size on held-out t=0 crops.

Cuts every region's t=0 view of a prepared corpus (as training cuts it), embeds the crops with the encoder of a
model config (optionally loading a pre-trained open_clip checkpoint), fits a logistic regression per facet on the
train split's regions and scores it on the held-out split. Side by side: the same architecture at random
initialisation, raw pixels (8x8 average-pooled RGB) and the majority answer. Four readings of the encoder are
probed: the CLIP image embedding, and what DynRefer reads, the CLS token, the mean of the feature grid and the grid
itself average-pooled to 4x4 (after ``ln_vision``). The last keeps where each feature is, as the RoI tokens with
their position code do: a shape is an arrangement, which a mean over positions loses.

    .venv/bin/python benchmarks/encoder_probe.py --prepared demo/prepared \
        --checkpoint demo/runs/pretrain-tiny/clip.safetensors [--model tiny] [--test-split test]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from dynrefer import storage
from dynrefer.batching import build_inputs, load_images
from dynrefer.config import ViewConfig, load_config
from dynrefer.encoder import ImageEncoder
from dynrefer.probe import facet_labels, majority_baseline, parse_facets, probe_scores


def t0_crops(prepared: str, split: str, size: int, limit: int | None) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Every region of ``split``: its t=0 view (N, S, S, 3) uint8 and its row (for the labels)."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(prepared, "regions"))
    rows = [r for r in table.to_pylist() if r["split"] == split][:limit]
    manifest = storage.read_json(os.path.join(prepared, "manifest.json"))
    prepared_size = manifest.get("prepare", {}).get("view_size")
    views, out = [], []
    for start in range(0, len(rows), 256):
        part = rows[start:start + 256]
        inputs = build_inputs(part, load_images(r["file"] for r in part), ViewConfig(num_views=1, fixed_ts=[0.0]),
                              size, "fixed", prepared_size=prepared_size)
        views.append(inputs.region_views()[:, 0])
        out += part
    return np.concatenate(views), out


@torch.no_grad()
def readings(encoder: ImageEncoder, crops: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """The encoder's image embedding, CLS token, mean grid feature and 4x4-pooled grid of each crop.  # each (N, D)"""
    encoder.eval()
    parts: dict[str, list[torch.Tensor]] = {"embedding": [], "cls": [], "grid mean": [], "grid 4x4": []}
    for i in range(0, len(crops), batch):
        views = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch]))
        feats = encoder(views)
        x = (views.permute(0, 3, 1, 2).float() / 255 - encoder.mean) / encoder.std
        parts["embedding"].append(encoder.clip.encode_image(x, normalize=True))
        parts["cls"].append(feats.cls)
        parts["grid mean"].append(feats.grid.mean(dim=(2, 3)))
        parts["grid 4x4"].append(torch.nn.functional.adaptive_avg_pool2d(feats.grid, 4).flatten(1))  # (N, 16 C)
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def pixels(crops: np.ndarray) -> np.ndarray:
    """8x8 average-pooled RGB.  # (N, 192)"""
    n, s = crops.shape[:2]
    return crops.reshape(n, 8, s // 8, 8, s // 8, 3).mean(axis=(2, 4)).reshape(n, -1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", default="demo/prepared", help="a prepare-stage output directory (local)")
    p.add_argument("--model", default="tiny", help="model config whose encoder is probed")
    p.add_argument("--checkpoint", help="open_clip checkpoint to load (default: the config's, if any)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--max-train", type=int, default=None, help="fit on at most this many train regions")
    p.add_argument("--facets", default="synthetic", help="'synthetic' or a JSON mapping facet -> vocabulary|null")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-initialisation baseline")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    facets = parse_facets(args.facets if args.facets == "synthetic" else json.loads(args.facets))
    names = list(facets)
    cfg = load_config(args.model)
    start = time.perf_counter()
    train_crops, train_rows = t0_crops(args.prepared, args.train_split, cfg.image_size, args.max_train)
    test_crops, test_rows = t0_crops(args.prepared, args.test_split, cfg.image_size, None)
    train_y = [facet_labels(r.get("category"), r.get("attributes"), facets) for r in train_rows]
    test_y = [facet_labels(r.get("category"), r.get("attributes"), facets) for r in test_rows]
    print(f"{len(train_rows)} {args.train_split} / {len(test_rows)} {args.test_split} regions, t=0 crops at "
          f"{cfg.image_size} px ({time.perf_counter() - start:.0f} s)")

    results: dict[str, dict[str, float]] = {"majority": majority_baseline(train_y, test_y, names)}
    results["raw pixels (8x8 RGB)"] = probe_scores(pixels(train_crops), train_y, pixels(test_crops), test_y, names)
    checkpoint = args.checkpoint or cfg.encoder.checkpoint
    encoders = [("random init", dataclasses.replace(cfg.encoder, checkpoint=None))]
    if checkpoint:
        encoders.append(("pre-trained", dataclasses.replace(cfg.encoder, checkpoint=checkpoint)))
    for label, enc_cfg in encoders:
        torch.manual_seed(args.seed)
        encoder = ImageEncoder(enc_cfg)
        train_f, test_f = readings(encoder, train_crops), readings(encoder, test_crops)
        for kind in train_f:
            results[f"{label}: {kind}"] = probe_scores(train_f[kind], train_y, test_f[kind], test_y, names)
    print(f"\nlinear-probe accuracy on {args.test_split} t=0 crops ({cfg.encoder.name}"
          f"{', ' + checkpoint if checkpoint else ''}; {time.perf_counter() - start:.0f} s)\n")
    print("| features | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, scores in results.items():
        print(f"| {label} | " + " | ".join(f"{100 * scores[n]:.1f}" if n in scores else "-" for n in names) + " |")
    if args.json:
        storage.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
