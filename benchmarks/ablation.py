"""The paper's ablation on the synthetic corpus: which views, and whether multi-task training helps.

Each variant of ``configs/ablation/*.yaml`` trains ``tiny`` with the training pipeline (Ray Train + DeepSpeed on
the local Ray cluster), as the demo does: a first run that aligns the Q-former's queries with text (BLIP-2's stage
1, ``first_run``), then DynRefer's losses from its export (``train_config``), both with the variant's views; it
captions the same held-out regions with its own inference-time views; the table gives
METEOR and CIDEr (pycocoevalcap, the split scored whole), what the captions say slot by slot (the share naming the
right shape, colour, pattern and size, all four, and the relation where the reference has one; parsed with the
corpus's grammar by :mod:`dynrefer.caption_content`), tag precision/recall, and category accuracy (the
contrastive head's class prompts).
Finished runs are reused (their export exists), so an interrupted ablation resumes where it stopped.

    python benchmarks/ablation.py --config configs/ablation/tiny.yaml   # needs demo/prepared (`make demo`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from dynrefer import metrics, storage
from dynrefer.batching import build_inputs, load_images, region_rng
from dynrefer.caption_content import content_scores
from dynrefer.config import _build, merge
from pipelines.args import secure_ray_env, setup_logging
from pipelines.train_data import ROW_COLUMNS, prepared_view_size, region_table
from pipelines.train_job import TrainJob

log = logging.getLogger("dynrefer.ablation")
INFERENCE = ("fixed", "random", "phash")


@dataclass
class Variant:
    name: str = ""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    inference: str = "phash"  # fixed | random (drawn per region, seeded) | phash
    trained_as: str | None = None  # reuse another variant's trained model
    first_run_as: str | None = None  # start from another variant's first run (same views, other second-run losses)
    fixed_ts: list[float] | None = None  # inference "fixed": these views instead of the model config's
    control_words: bool = True  # inference: False captions without the predicted tags as control words


@dataclass
class Ablation:
    train_config: str = "configs/train/tiny.yaml"
    first_run: str | None = None  # the Q-former's text-alignment run; None: the second run starts from scratch
    prepared: str = "demo/prepared"
    storage_path: str = "runs/ablation"
    max_steps: int | None = None  # every run's steps; None: each train config's own
    split: str = "test"
    max_regions: int = 600
    batch_size: int = 32
    seed: int = 0
    variants: list[Variant] = field(default_factory=list)

    @classmethod
    def from_yaml(cls, path: str) -> "Ablation":
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        variants = [_build(Variant, v, f"{path}: variants[{i}]") for i, v in enumerate(data.pop("variants", []))]
        out = _build(cls, data, path)
        out.variants = variants
        names = {v.name for v in variants}
        for v in variants:
            if v.inference not in INFERENCE:
                raise ValueError(f"{path}: variant {v.name!r}: inference must be one of {INFERENCE}")
            for key in ("trained_as", "first_run_as"):
                if getattr(v, key) is not None and getattr(v, key) not in names:
                    raise ValueError(f"{path}: variant {v.name!r} is {key} unknown variant {getattr(v, key)!r}")
        return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _job(ablation: Ablation, config: str, name: str, overrides: dict[str, Any], **settings: Any) -> TrainJob:
    """One run of a variant: ``config`` on the ablation's corpus, with the variant's model overrides."""
    steps = {"max_steps": ablation.max_steps} if ablation.max_steps else {}
    job = TrainJob.from_yaml(config, **{
        "data.prepared": [ablation.prepared], "storage_path": ablation.storage_path, "name": name,
        "seed": ablation.seed, **steps, **settings})
    job.model_overrides = merge(job.model_overrides, overrides)
    return job


def _train(job: TrainJob, what: str) -> str:
    """Train (or reuse a finished run's export); returns the export directory."""
    from pipelines.train import run

    export = job.absolute().export_uri
    if storage.exists(storage.join(export, "config.json")):
        log.info("[%s] trained already: %s", what, export)
    else:
        log.info("[%s] training %d steps", what, job.max_steps)
        run(job)
    return export


def train_variant(ablation: Ablation, variant: Variant, variants: dict[str, Variant]) -> str:
    """Train (or reuse) the variant's model, its first run too; returns its export directory."""
    # one val pass at the end: it sets the export's tag threshold when the train config asks (as in the demo)
    job = _job(ablation, ablation.train_config, slug(variant.name), variant.model_overrides, **{"eval.every": 0})
    if ablation.first_run is None:
        job = dataclasses.replace(job, init_from=None)
    else:
        first = variants[variant.first_run_as] if variant.first_run_as else variant
        first_job = _job(ablation, ablation.first_run, slug(first.name) + "-first", first.model_overrides)
        job = dataclasses.replace(job, init_from=_train(first_job, f"{first.name}, first run"))
    return _train(job, variant.name)


def held_out_rows(ablation: Ablation) -> list[dict[str, Any]]:
    """The first ``max_regions`` regions of the split (by region id), the same for every variant."""
    table = region_table([ablation.prepared], None, ROW_COLUMNS + ["split", "category", "attributes", "image_id"])
    rows = [r for r in table.to_pylist() if r["split"] == ablation.split]
    rows.sort(key=lambda r: (len(r["region_id"]), r["region_id"]))
    if not rows:
        raise ValueError(f"{ablation.prepared}: no regions of split {ablation.split!r}")
    return rows[: ablation.max_regions]


def score_variant(export: str, variant: Variant, rows: list[dict[str, Any]], ablation: Ablation,
                  meteor: metrics.MeteorScorer) -> dict[str, Any]:
    """Caption the held-out rows with the variant's inference views and score them."""
    import torch

    from dynrefer.checkpoint import load_pretrained

    model = load_pretrained(export)
    cfg = model.cfg
    if variant.fixed_ts is not None:
        cfg.views = dataclasses.replace(cfg.views, fixed_ts=list(variant.fixed_ts))
    model.language.cfg.control_words = variant.control_words
    mode = "train" if variant.inference == "random" else variant.inference  # "train" draws at random
    prepared_size = prepared_view_size([ablation.prepared], None)
    images = load_images(r["file"] for r in rows)
    captions: dict[str, str] = {}
    said: dict[tuple[str, str], dict[str, Any]] = {}
    correct = recognised = 0
    start = time.perf_counter()
    for i in range(0, len(rows), ablation.batch_size):
        chunk = rows[i: i + ablation.batch_size]
        rngs = [region_rng(ablation.seed, 0, r["region_id"]) for r in chunk] if mode == "train" else None
        inputs = build_inputs(chunk, images, cfg.views, cfg.image_size, mode, rngs, prepared_size)
        preds = model.predict(*(torch.from_numpy(a) for a in (inputs.views, inputs.view_index, inputs.rois)))
        for row, pred in zip(chunk, preds):
            captions[row["region_id"]] = pred.caption
            rec = pred.recognition
            said[(str(row["image_id"]), str(row["region_id"]))] = {
                "caption": pred.caption, "tags": [t for t, _ in pred.tags],
                "category": rec.category if rec else None, "attributes": [a for a, _ in rec.attributes] if rec else [],
                "attribute_scores": rec.attribute_scores if rec else {}}
            if pred.recognition is not None and row.get("category"):
                recognised += 1
                correct += pred.recognition.category == row["category"]
    seconds = time.perf_counter() - start
    references = {r["region_id"]: list(r["captions"] or [r["caption"]]) for r in rows}
    scores = metrics.caption_scores(captions, references, meteor)
    example = rows[0]["region_id"]
    content = content_scores(rows, said)
    slots = {s: 100 * v["correct"] for s, v in content["slots"].items()}
    return {"variant": variant.name, "views": cfg.views.num_views, "inference": variant.inference,
            "meteor": 100 * scores["meteor"], "cider": 100 * scores["cider"], "slots": slots,
            "relation_precision": 100 * content["slots"]["relation"]["precision"],
            "all_four": 100 * content["all_four"], "all_four_size_optional": 100 * content["all_four_size_optional"],
            "tag_precision": 100 * content["tags"]["precision"], "tag_recall": 100 * content["tags"]["recall"],
            "regions_with_tags": 100 * sum(bool(p["tags"]) for p in said.values()) / len(said),
            "category_accuracy": 100 * correct / recognised if recognised else None,
            "regions": scores["regions"], "regions_per_second": len(rows) / seconds,
            "example": {"region_id": example, "prediction": captions[example], "reference": references[example][0]}}


def markdown(results: list[dict[str, Any]], ablation: Ablation) -> str:
    def steps(config: str) -> int:
        return ablation.max_steps or TrainJob.from_yaml(config).max_steps

    runs = (f"a first run of {steps(ablation.first_run)} steps, then {steps(ablation.train_config)}"
            if ablation.first_run else f"{steps(ablation.train_config)} steps")
    lines = [f"Tiny, {runs} per variant, {results[0]['regions']} held-out regions "
             f"({ablation.split} split). Slots: % of regions whose caption names it right (relation: of the regions "
             "whose reference names one; rel. prec.: right when named).", "",
             "| variant | views | inference views | METEOR | CIDEr | shape | colour | pattern | size | all four "
             "| all four, size optional | relation | rel. prec. | tags P / R | category acc. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = "-" if r["category_accuracy"] is None else f"{r['category_accuracy']:.1f}"
        s = r["slots"]
        lines.append(f"| {r['variant']} | {r['views']} | {r['inference']} | {r['meteor']:.1f} | {r['cider']:.1f} "
                     f"| {s['shape']:.1f} | {s['colour']:.1f} | {s['pattern']:.1f} | {s['size']:.1f} "
                     f"| {r['all_four']:.1f} | {r['all_four_size_optional']:.1f} | {s['relation']:.1f} "
                     f"| {r['relation_precision']:.1f} "
                     f"| {r['tag_precision']:.0f} / {r['tag_recall']:.0f} | {acc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ablation/tiny.yaml")
    p.add_argument("--max-steps", type=int, help="override the steps per variant")
    p.add_argument("--storage-path", help="override where runs and results go (finished runs there are reused)")
    p.add_argument("--only", action="append", help="run only these variants (repeatable)")
    args = p.parse_args(argv)
    setup_logging()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".cache/torch_extensions"))
    ablation = Ablation.from_yaml(args.config)
    if args.max_steps:
        ablation = dataclasses.replace(ablation, max_steps=args.max_steps)
    if args.storage_path:
        ablation = dataclasses.replace(ablation, storage_path=args.storage_path)
    variants = {v.name: v for v in ablation.variants}
    chosen = [v for v in ablation.variants if not args.only or v.name in args.only]

    import ray

    secure_ray_env()
    ray.init(include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = held_out_rows(ablation)
    results = []
    with metrics.MeteorScorer() as meteor:
        for variant in chosen:
            export = train_variant(ablation, variants[variant.trained_as] if variant.trained_as else variant,
                                   variants)
            results.append(score_variant(export, variant, rows, ablation, meteor))
            log.info("[%s] METEOR %.1f CIDEr %.1f", variant.name, results[-1]["meteor"], results[-1]["cider"])
    ray.shutdown()
    table = markdown(results, ablation)
    storage.write_json(storage.join(ablation.storage_path, "ablation.json"), {"config": args.config,
                                                                             "results": results})
    storage.write_bytes(storage.join(ablation.storage_path, "ablation.md"), table.encode())
    print(table)
    print(json.dumps([r["example"] | {"variant": r["variant"]} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
