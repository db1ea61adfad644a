"""Score a predictions file against the prepare stage's regions: captioning, dense captioning, attributes,
recognition, and (on the synthetic corpus) what the captions say slot by slot.

    python -m pipelines.evaluate --config configs/evaluate/synthetic.yaml [--predictions P] [--out DIR] ...
    python -m pipelines.evaluate --predictions preds.parquet --prepared DIR --split test --task caption --out DIR

Predictions (Parquet file or directory, or JSON Lines; local or s3://), one row per region:
``image_id``, ``region_id``, ``caption``; optionally ``score`` (a detector's box score) and ``caption_score`` (the
caption's probability), which rank dense predictions (:func:`dense_rank_score`), ``box`` (``[x1, y1, x2, y2]``;
dense falls back to the region's own box), ``tags``, ``category``, ``attributes``, and ``attribute_scores`` and
``category_scores`` (name -> score, as a JSON object, a Parquet struct or a Parquet map). References are
``<prepared>/regions/*.parquet``. Rows with a non-empty ``error`` (as ``dynrefer caption`` writes for unreadable
images and bad boxes) are no predictions: they are counted in ``error_rows`` and their regions count as missing.

Every reference region of the split is scored, the split whole (CIDEr's document frequencies come from it). One
without a prediction row is counted in ``missing_predictions`` and scored as the worst answer: an empty caption,
the lowest attribute and class scores (for dense captioning it is a box never detected). Prediction rows matching
no reference region are counted, and used only by dense captioning, which matches by image and box. Every report
names the split and each task's protocol. Writes ``metrics.json`` and ``metrics.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from dynrefer import caption_content, metrics, storage
from dynrefer.caption_files import read_caption_rows
from dynrefer.config import _build
from pipelines.args import add_storage_args, read_job_file, setup_logging, storage_options_from_args

log = logging.getLogger("dynrefer.evaluate")

TASKS = ("caption", "dense", "attributes", "recognition", "content")
DENSE_RANKS = ("auto", "score", "caption_score")  # what ranks dense predictions: see dense_rank_score
REFERENCE_COLUMNS = ("image_id", "region_id", "box", "caption", "captions", "category", "attributes",
                     "attribute_labels", "tags", "split")
Key = tuple[str, str]


def _read_parquet(uri: str, so: storage.StorageOptions | None, columns: Iterable[str] | None = None
                  ) -> list[dict[str, Any]]:
    """Rows of a Parquet file, or of every ``*.parquet`` directly under a directory (never a half-written temp)."""
    fs, path = storage.filesystem(uri, so)
    files = [path]
    if fs.isdir(path):
        files = [storage.join(uri, n) for n in storage.listdir(uri, so) if n.endswith(".parquet")]
        if not files:
            raise FileNotFoundError(f"{uri}: no Parquet files")
        files = [storage.filesystem(f, so)[1] for f in files]
    rows: list[dict[str, Any]] = []
    for f in files:
        with fs.open(f, "rb") as handle:
            pf = pq.ParquetFile(handle)
            wanted = [c for c in columns if c in pf.schema_arrow.names] if columns is not None else None
            rows.extend(pf.read(columns=wanted).to_pylist())
    return rows


def read_references(prepared: str, split: str | None = None, so: storage.StorageOptions | None = None
                    ) -> list[dict[str, Any]]:
    """The prepared regions (without their views), optionally of one split."""
    rows = _read_parquet(storage.join(prepared, "regions"), so, REFERENCE_COLUMNS)
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
        if not rows:
            raise ValueError(f"{prepared}: no region of split {split!r}")
    return rows


def _key(row: dict[str, Any]) -> Key | None:
    if row.get("image_id") is None or row.get("region_id") is None:
        return None
    return str(row["image_id"]), str(row["region_id"])


def _score_map(value: Any, where: str) -> dict[str, float]:
    """name -> score from a JSON object, a Parquet struct (a dict) or a Parquet map (a list of pairs)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = value
    else:
        raise ValueError(f"{where}: expected name -> score pairs, got {type(value).__name__}")
    return {str(k): float(v) for k, v in items if v is not None}


def _references_of(row: dict[str, Any]) -> list[str]:
    return [c for c in (row.get("captions") or ([row["caption"]] if row.get("caption") else [])) if c and c.strip()]


def _caption(refs: list[dict[str, Any]], preds: dict[Key, dict[str, Any]],
             meteor: metrics.MeteorScorer) -> dict[str, Any]:
    references = {_key(r): _references_of(r) for r in refs}
    predictions = {k: str(p.get("caption") or "") for k, p in preds.items() if k in references}
    return metrics.caption_scores(predictions, references, meteor=meteor)


def _number(value: Any) -> float | None:
    """A finite float, or None for a value that is absent (None, or NaN as Parquet hands back a null float)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def dense_rank_score(row: dict[str, Any], rank: str = "auto") -> tuple[float | None, str]:
    """A dense prediction's ranking score and where it came from.

    ``auto``: the detector's or proposer's box ``score`` where there is one (DenseCap ranks by box confidence);
    else, for captions of given boxes (``dynrefer caption --prepared`` writes no score), the caption's own
    ``caption_score``. ``score`` or ``caption_score`` use that column alone. (None, "constant") when the chosen
    column is absent.
    """
    if rank not in DENSE_RANKS:
        raise ValueError(f"dense ranking must be one of {DENSE_RANKS}, got {rank!r}")
    for column in (("score", "caption_score") if rank == "auto" else (rank,)):
        value = _number(row.get(column))
        if value is not None:
            return value, column
    return None, "constant"


def _dense(refs: list[dict[str, Any]], rows: list[dict[str, Any]], meteor: metrics.MeteorScorer,
           compat: str = "none", rank: str = "auto") -> dict[str, Any]:
    by_key = {_key(r): r for r in refs}
    ground_truth = [{"image_id": str(r["image_id"]), "box": r["box"], "captions": _references_of(r)}
                    for r in refs if _references_of(r)]
    predictions, without_box = [], 0
    ranked_by: dict[str, int] = {"score": 0, "caption_score": 0, "constant": 0}
    for row in rows:
        box = row.get("box")
        if box is None and _key(row) in by_key:
            box = by_key[_key(row)]["box"]
        if box is None:
            without_box += 1
            continue
        if len(box) != 4:
            raise ValueError(f"dense: prediction for image {row['image_id']} has box {box}; expected 4 numbers")
        score, source = dense_rank_score(row, rank)
        ranked_by[source] += 1
        predictions.append({"image_id": str(row["image_id"]), "box": box, "caption": row.get("caption") or "",
                            "score": 1.0 if score is None else score})
    if without_box:
        log.warning("dense: %d prediction rows have no box and match no region; they cannot be scored", without_box)
    if ranked_by["constant"]:
        log.warning("dense: %d of %d predictions carry no %s (outputs from before caption scores?); they are ranked "
                    "by a constant 1.0, ties in input order, which makes their AP depend on row order",
                    ranked_by["constant"], len(predictions),
                    "score or caption_score" if rank == "auto" else rank)
    out = metrics.densecap_map(predictions, ground_truth, meteor=meteor, compat=compat)
    out.update(regions_without_reference=len(refs) - len(ground_truth), predictions_without_box=without_box,
               ranked_by={k: v for k, v in ranked_by.items() if v}, rank=rank,
               predictions_without_score=ranked_by["constant"])
    return out


def _attributes(refs: list[dict[str, Any]], preds: dict[Key, dict[str, Any]],
                groups: dict[str, list[str]] | None, vocabulary: list[dict[str, Any]] | None = None
                ) -> dict[str, Any]:
    """OVAD's box-oracle protocol when the references carry OVAD label vectors (``attribute_labels``, named by
    ``vocabulary``); otherwise each region's ``attributes`` are its positives and every other attribute named in
    the predictions a negative."""
    maps = {k: _score_map(p.get("attribute_scores"), f"attribute_scores of region {k}") for k, p in preds.items()}
    labelled = [r for r in refs if r.get("attribute_labels")]
    if labelled or vocabulary is not None:
        return _ovad_attributes(labelled, maps, vocabulary)
    names = sorted({n for m in maps.values() for n in m})
    if not names:
        raise ValueError("attributes: no prediction row has attribute_scores")
    index = {n: i for i, n in enumerate(names)}
    scores = np.full((len(refs), len(names)), -np.inf)
    labels = np.zeros((len(refs), len(names)), dtype=np.int8)
    outside = 0
    for i, r in enumerate(refs):
        for n, s in maps.get(_key(r), {}).items():
            scores[i, index[n]] = s
        for n in r.get("attributes") or []:
            if n in index:
                labels[i, index[n]] = 1
            else:
                outside += 1
    out = metrics.attribute_map(scores, labels, names, groups)
    out["reference_attributes_outside_vocabulary"] = outside
    out["protocol"] = ("attribute mAP over the given boxes: a region's attributes are its positives, every other "
                       "predicted attribute a negative; mean over attributes with a positive")
    return out


def _ovad_attributes(refs: list[dict[str, Any]], maps: dict[Key, dict[str, float]],
                     vocabulary: list[dict[str, Any]] | None) -> dict[str, Any]:
    if vocabulary is None:
        raise ValueError("attributes: the references carry OVAD label vectors (attribute_labels); give the OVAD "
                         "annotation JSON (--ovad-annotations) whose attributes name their columns")
    if not refs:
        raise ValueError("attributes: --ovad-annotations given but no reference region carries attribute_labels")
    names = [str(a["name"]) for a in vocabulary]
    bad = [_key(r) for r in refs if len(r["attribute_labels"]) != len(names)]
    if bad:
        raise ValueError(f"attributes: {len(bad)} regions have attribute_labels of another length than the "
                         f"{len(names)} OVAD attributes, e.g. {bad[0]}")
    index = {n: i for i, n in enumerate(names)}
    scores = np.full((len(refs), len(names)), -np.inf)  # a box never scored ranks last (0 after clipping)
    labels = np.array([r["attribute_labels"] for r in refs], dtype=np.int8)  # (boxes, attributes)
    unknown: set[str] = set()
    for i, r in enumerate(refs):
        for n, s in maps.get(_key(r), {}).items():
            if n in index:
                scores[i, index[n]] = s
            else:
                unknown.add(n)
    unscored = [n for j, n in enumerate(names) if np.isneginf(scores[:, j]).all()]
    if len(unscored) == len(names):
        raise ValueError("attributes: no prediction scores any OVAD attribute by its OVAD name "
                         f"(e.g. {names[0]!r}); predictions name {sorted(unknown)[:3]}")
    if unscored:
        log.warning("attributes: %d OVAD attributes have no score in any prediction (ranked last), e.g. %s",
                    len(unscored), unscored[:3])
    out = metrics.ovad_attribute_map(scores, labels, vocabulary)
    out.update(attributes_without_scores=len(unscored), predicted_attributes_outside_vocabulary=len(unknown))
    return out


def _content(refs: list[dict[str, Any]], preds: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    rows = {k: {**p, "attribute_scores": _score_map(p.get("attribute_scores"), f"attribute_scores of region {k}")}
            for k, p in preds.items()}
    return caption_content.content_scores(refs, rows, key=_key)


def _recognition(refs: list[dict[str, Any]], preds: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    refs = [r for r in refs if r.get("category") is not None]
    maps = {k: _score_map(p.get("category_scores"), f"category_scores of region {k}") for k, p in preds.items()}
    names = sorted({n for m in maps.values() for n in m})
    if not names or not refs:
        raise ValueError("recognition: needs category_scores in the predictions and category in the references")
    index = {n: i for i, n in enumerate(names)}
    scores = np.full((len(refs), len(names)), -np.inf)
    for i, r in enumerate(refs):
        for n, s in maps.get(_key(r), {}).items():
            scores[i, index[n]] = s
    targets = np.array([index.get(str(r["category"]), -1) for r in refs])
    return metrics.recognition_scores(scores, targets, names)


def evaluate(predictions: list[dict[str, Any]], references: list[dict[str, Any]], tasks: Iterable[str],
             attribute_groups: dict[str, list[str]] | None = None, densecap_compat: str = "none",
             dense_rank: str = "auto", ovad_vocabulary: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The metrics of ``tasks`` plus an ``inputs`` block counting missing, unmatched and duplicate rows."""
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be among {', '.join(TASKS)}; got {tasks}")
    ref_keys = {_key(r) for r in references}
    if None in ref_keys or len(ref_keys) != len(references):
        raise ValueError("references: every region needs an image_id and a region_id, unique together")
    error_rows = sum(1 for row in predictions if row.get("error"))
    predictions = [row for row in predictions if not row.get("error")]
    if any(row.get("image_id") is None for row in predictions):
        raise ValueError("predictions: every row needs an image_id")
    preds: dict[Key, dict[str, Any]] = {}
    duplicates = 0
    for row in predictions:
        key = _key(row)
        if key is not None:
            duplicates += key in preds
            preds.setdefault(key, row)
    if duplicates and tasks != ["dense"]:
        raise ValueError(f"predictions: {duplicates} rows repeat an (image_id, region_id) already given")
    missing = sorted(k for k in ref_keys if k not in preds)
    result: dict[str, Any] = {"inputs": {
        "reference_regions": len(references), "prediction_rows": len(predictions), "error_rows": error_rows,
        "missing_predictions": len(missing), "missing_examples": [list(k) for k in missing[:5]],
        "unmatched_predictions": sum(k not in ref_keys for k in preds) + sum(_key(r) is None for r in predictions),
    }}
    if missing and tasks != ["dense"]:  # dense captioning matches by box, not by region id
        log.warning("%d of %d reference regions have no prediction (scored as the worst answer), e.g. %s",
                    len(missing), len(references), missing[:3])
    with contextlib.ExitStack() as stack:
        meteor = stack.enter_context(metrics.MeteorScorer()) if {"caption", "dense"} & set(tasks) else None
        for task in tasks:
            log.info("scoring %s", task)
            if task == "caption":
                result[task] = _caption(references, preds, meteor)
            elif task == "dense":
                result[task] = _dense(references, predictions, meteor, densecap_compat, dense_rank)
            elif task == "attributes":
                result[task] = _attributes(references, preds, attribute_groups, ovad_vocabulary)
            elif task == "content":
                result[task] = _content(references, preds)
            else:
                result[task] = _recognition(references, preds)
    return result


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _split_line(split: str | None) -> str:
    return (f"Split **{split}**, scored whole." if split else
            "Every region of the prepared output (no split chosen), scored whole.")


def markdown(result: dict[str, Any]) -> str:
    """A human-readable summary that names the split and each task's protocol; scores times 100, as papers print
    them."""
    inputs = result["inputs"]
    lines = ["# Evaluation", "", _split_line(result.get("split")), "",
             "| reference regions | prediction rows | missing predictions | unmatched predictions |",
             "|---:|---:|---:|---:|",
             f"| {inputs['reference_regions']} | {inputs['prediction_rows']} | {inputs['missing_predictions']} "
             f"| {inputs['unmatched_predictions']} |", ""]
    if "caption" in result:
        c = result["caption"]
        lines += ["## Region captioning", "", "METEOR and CIDEr by pycocoevalcap after its PTB tokenizer, the split "
                  "scored whole.", "", "| regions | METEOR | CIDEr |", "|---:|---:|---:|",
                  f"| {c['regions']} | {_pct(c['meteor'])} | {_pct(c['cider'])} |", ""]
    if "dense" in result:
        lines += _dense_markdown(result["dense"])
    if "attributes" in result:
        a = result["attributes"]
        groups = {**a.get("groups", {}), **a.get("frequency_groups", {})}
        heads = ["regions", "attributes", "mAP", *groups]
        cells = [str(a["regions"]), str(a["attributes_evaluated"]), _pct(a["map"]), *map(_pct, groups.values())]
        lines += ["## Attribute detection", "", a.get("protocol", "") + ".", "",
                  "| " + " | ".join(heads) + " |", "|" + "---:|" * len(heads), "| " + " | ".join(cells) + " |", ""]
        if a.get("type_groups"):
            lines += ["| " + " | ".join(a["type_groups"]) + " |", "|" + "---:|" * len(a["type_groups"]),
                      "| " + " | ".join(map(_pct, a["type_groups"].values())) + " |", ""]
    if "recognition" in result:
        r = result["recognition"]
        lines += ["## Region recognition", "", "Given boxes; accuracy of the best class, mAP over classes.", "",
                  "| regions | classes | accuracy | mAP |", "|---:|---:|---:|---:|",
                  f"| {r['regions']} | {r['classes_evaluated']} | {_pct(r['accuracy'])} | {_pct(r['map'])} |", ""]
    if "content" in result:
        lines += content_markdown(result["content"])
    return "\n".join(lines)


def _dense_markdown(d: dict[str, Any]) -> list[str]:
    heads = list(next(iter(d["ap"].values())))
    ranked = ", ".join(f"{n} by {k}" for k, n in d.get("ranked_by", {}).items())
    lines = ["## Dense captioning (DenseCap protocol)", "",
             f"{d['protocol']}. Ties in score: {d['ties']}. Lua compatibility: {d['compat']}.", "",
             f"mAP **{_pct(d['map'])}** ({d['pairs']} pairs), detection mAP {_pct(d['det_map'])} (any caption); "
             f"{d['predictions']} predictions (ranked: {ranked or 'none'}), {d['merged_ground_truth_regions']} "
             f"ground-truth regions after merging {d['ground_truth_regions']}.", "",
             "| IoU \\ METEOR | any | " + " | ".join(f"> {h}" for h in heads) + " |",
             "|---|---:|" + "---:|" * len(heads)]
    lines += [f"| {t} | {_pct(d['det_ap'][t])} | " + " | ".join(_pct(row[h]) for h in heads) + " |"
              for t, row in d["ap"].items()]
    return lines + [""]


def content_markdown(c: dict[str, Any]) -> list[str]:
    """The caption-content section: per slot, the share of regions whose caption names the right value."""
    slots = c["slots"]
    lines = ["## What the captions say (synthetic corpus)", "",
             f"{c['protocol']}. Relation and neighbour: the {c['regions_with_relation']} regions whose reference "
             f"caption names one.", "",
             "| | " + " | ".join(slots) + " | all four | all four, size optional |",
             "|---|" + "---:|" * (len(slots) + 2),
             "| right | " + " | ".join(_pct(v["correct"]) for v in slots.values())
             + f" | {_pct(c['all_four'])} | {_pct(c['all_four_size_optional'])} |",
             "| named | " + " | ".join(_pct(v["named"]) for v in slots.values()) + " | | |",
             "| right when named | " + " | ".join(_pct(v["precision"]) for v in slots.values()) + " | | |", "",
             "The grammar leaves size and relation optional (the corpus's own captions name a size for about 58% of "
             "regions), so read the size, relation and neighbour columns by their right-when-named row.", "",
             f"{c['regions']} regions, {_pct(c['grammatical'])}% of captions in the corpus's grammar. Tags: "
             f"precision {_pct(c['tags']['precision'])}, recall {_pct(c['tags']['recall'])}. Category accuracy "
             f"{_pct(c['category_accuracy'])}; attribute accuracy (best-scored of each slot) colour "
             f"{_pct(c['attribute_accuracy']['colour'])}, pattern {_pct(c['attribute_accuracy']['pattern'])}, "
             f"size {_pct(c['attribute_accuracy']['size'])}, all three {_pct(c['attribute_accuracy']['all_three'])}.",
             ""]
    return lines


def _json_safe(obj: Any) -> Any:
    """NaN (an AP without positives) becomes null: strict JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


@dataclass
class EvaluateJob:
    """What to score and how; a YAML file under configs/evaluate/ gives these keys, the command line overrides."""

    predictions: str = ""  # a Parquet file or directory, or JSON Lines (local or s3://)
    prepared: str = ""  # the prepare stage's output (its regions/ shards are the references)
    split: str | None = None  # score only this split's regions (None: all)
    tasks: list[str] = field(default_factory=list)  # among TASKS
    out: str = ""  # where metrics.json and metrics.md go
    attribute_groups: str | None = None  # JSON {group: [attribute names]} for the positive-list protocol
    ovad_annotations: str | None = None  # OVAD's JSON: its attributes name the references' attribute_labels
    densecap_compat: str = "none"  # none | lua (the reference's index -1 artifact)
    dense_rank: str = "auto"  # auto | score | caption_score
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | None, **overrides: Any) -> "EvaluateJob":
        data = read_job_file(path, overrides) if path else {k: v for k, v in overrides.items() if v is not None}
        job = _build(cls, data, path or "command line")
        if isinstance(job.tasks, str):
            job.tasks = [job.tasks]
        job.tasks = [t.strip() for entry in job.tasks or [] for t in str(entry).split(",") if t.strip()]
        missing = [name for name in ("predictions", "prepared", "out") if not getattr(job, name)]
        if missing or not job.tasks:
            flags = [f"--{n}" for n in missing] + (["--task"] if not job.tasks else [])
            raise ValueError(f"evaluate: {', '.join(flags)} needed (on the command line or in the job file)")
        unknown = [t for t in job.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks must be among {', '.join(TASKS)}; got {unknown}")
        if job.densecap_compat not in metrics.DENSECAP_COMPAT:
            raise ValueError(f"densecap_compat must be one of {metrics.DENSECAP_COMPAT}, got {job.densecap_compat!r}")
        if job.dense_rank not in DENSE_RANKS:
            raise ValueError(f"dense_rank must be one of {DENSE_RANKS}, got {job.dense_rank!r}")
        return job


def read_ovad_vocabulary(uri: str, so: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """OVAD's attributes, ordered by id (the order of every ``att_vec``), with their ``freq_set`` and types."""
    data = storage.read_json(uri, so)
    entries = data.get("attributes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(a, dict) and "name" in a and "id" in a for a in entries):
        raise ValueError(f"{uri}: expected OVAD's JSON with an 'attributes' list of {{id, name, ...}}")
    entries = sorted(entries, key=lambda a: a["id"])
    if [a["id"] for a in entries] != list(range(len(entries))):
        raise ValueError(f"{uri}: attribute ids must number them 0..N-1 (att_vec is indexed by them)")
    return entries


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer evaluate", description=__doc__.split("\n\n")[0],
                                epilog="Needs `java` for METEOR and the PTB tokenizer (caption, dense).")
    p.add_argument("--config", help="job file under configs/evaluate/ (every flag below overrides it)")
    p.add_argument("--predictions", help="predictions: .parquet file, directory of them, or .jsonl")
    p.add_argument("--prepared", help="the prepare stage's output directory (its regions/ shards)")
    p.add_argument("--split", help="score only the reference regions of this split")
    p.add_argument("--task", action="append",
                   help=f"{'|'.join(TASKS)}; repeat or comma-separate for several")
    p.add_argument("--attribute-groups", help="JSON {group: [attribute names]}, for references without OVAD labels")
    p.add_argument("--ovad-annotations", help="OVAD's JSON: the attribute vocabulary of the references' label vectors")
    p.add_argument("--densecap-compat", choices=metrics.DENSECAP_COMPAT,
                   help="lua: reproduce the reference evaluator's index -1 artifact (default none)")
    p.add_argument("--dense-rank", choices=DENSE_RANKS,
                   help="what ranks dense predictions: auto (box score, else caption score), score, caption_score")
    p.add_argument("--out", help="output directory or s3:// prefix for metrics.json and metrics.md")
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    try:
        job = EvaluateJob.from_yaml(args.config, predictions=args.predictions, prepared=args.prepared,
                                    split=args.split, tasks=args.task, out=args.out,
                                    attribute_groups=args.attribute_groups, ovad_annotations=args.ovad_annotations,
                                    densecap_compat=args.densecap_compat, dense_rank=args.dense_rank,
                                    storage_options=storage_options_from_args(args) or None)
        so = job.storage_options or None
        groups = storage.read_json(job.attribute_groups, so) if job.attribute_groups else None
        vocabulary = read_ovad_vocabulary(job.ovad_annotations, so) if job.ovad_annotations else None
        result = evaluate(read_caption_rows(job.predictions, so), read_references(job.prepared, job.split, so),
                          job.tasks, groups, job.densecap_compat, job.dense_rank, vocabulary)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    result = _json_safe({"predictions": job.predictions, "prepared": job.prepared, "split": job.split, **result})
    storage.write_bytes(storage.join(job.out, "metrics.json"), json.dumps(result, indent=2).encode(), so)
    storage.write_bytes(storage.join(job.out, "metrics.md"), markdown(result).encode(), so)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
