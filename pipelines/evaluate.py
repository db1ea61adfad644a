"""Score a predictions file against the prepare stage's regions: captioning, dense captioning, attributes, recognition.

    python -m pipelines.evaluate --predictions preds.parquet --prepared DIR --split test --task caption --out DIR

Predictions (Parquet file or directory, or JSON Lines; local or s3://), one row per region:
``image_id``, ``region_id``, ``caption``; optionally ``score`` (dense ranking; 1.0 when absent), ``box``
(``[x1, y1, x2, y2]``; dense falls back to the region's own box), ``attribute_scores`` and ``category_scores``
(name -> score, as a JSON object, a Parquet struct or a Parquet map). References are ``<prepared>/regions/*.parquet``.
Rows with a non-empty ``error`` (as ``dynrefer caption`` writes for unreadable images and bad boxes) are no
predictions: they are counted in ``error_rows`` and their regions count as missing.

Every reference region is scored. One without a prediction row is counted in ``missing_predictions`` and scored as
the worst answer: an empty caption, the lowest attribute and class scores (for dense captioning it is a box never
detected). Prediction rows matching no reference region are counted, and used only by dense captioning, which
matches by image and box. Writes ``metrics.json`` and ``metrics.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from dynrefer import metrics, storage
from pipelines.args import add_storage_args, setup_logging, storage_options_from_args

log = logging.getLogger("dynrefer.evaluate")

TASKS = ("caption", "dense", "attributes", "recognition")
REFERENCE_COLUMNS = ("image_id", "region_id", "box", "caption", "captions", "category", "attributes", "split")
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


def read_predictions(uri: str, so: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """Prediction rows from Parquet or JSON Lines (``.jsonl``): a file, or a directory of either."""
    fs, path = storage.filesystem(uri, so)
    if not uri.endswith(".jsonl") and fs.isdir(path):
        lines = [n for n in storage.listdir(uri, so) if n.endswith(".jsonl")]
        if lines and not any(n.endswith(".parquet") for n in storage.listdir(uri, so)):
            return [row for n in lines for row in read_predictions(storage.join(uri, n), so)]
    if uri.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(storage.read_bytes(uri, so).decode().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{uri}: line {n}: invalid JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{uri}: line {n}: expected a JSON object")
                rows.append(row)
        return rows
    return _read_parquet(uri, so)


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


def _dense(refs: list[dict[str, Any]], rows: list[dict[str, Any]], meteor: metrics.MeteorScorer
           ) -> dict[str, Any]:
    by_key = {_key(r): r for r in refs}
    ground_truth = [{"image_id": str(r["image_id"]), "box": r["box"], "captions": _references_of(r)}
                    for r in refs if _references_of(r)]
    predictions, without_box, without_score = [], 0, 0
    for row in rows:
        box = row.get("box")
        if box is None and _key(row) in by_key:
            box = by_key[_key(row)]["box"]
        if box is None:
            without_box += 1
            continue
        if len(box) != 4:
            raise ValueError(f"dense: prediction for image {row['image_id']} has box {box}; expected 4 numbers")
        without_score += row.get("score") is None
        predictions.append({"image_id": str(row["image_id"]), "box": box, "caption": row.get("caption") or "",
                            "score": 1.0 if row.get("score") is None else float(row["score"])})
    if without_box:
        log.warning("dense: %d prediction rows have no box and match no region; they cannot be scored", without_box)
    out = metrics.densecap_map(predictions, ground_truth, meteor=meteor)
    out.update(regions_without_reference=len(refs) - len(ground_truth), predictions_without_box=without_box,
               predictions_without_score=without_score)
    return out


def _attributes(refs: list[dict[str, Any]], preds: dict[Key, dict[str, Any]],
                groups: dict[str, list[str]] | None) -> dict[str, Any]:
    maps = {k: _score_map(p.get("attribute_scores"), f"attribute_scores of region {k}") for k, p in preds.items()}
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
    return out


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
             attribute_groups: dict[str, list[str]] | None = None) -> dict[str, Any]:
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
                result[task] = _dense(references, predictions, meteor)
            elif task == "attributes":
                result[task] = _attributes(references, preds, attribute_groups)
            else:
                result[task] = _recognition(references, preds)
    return result


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """A human-readable summary; scores times 100, as papers print them."""
    inputs = result["inputs"]
    lines = ["# Evaluation", "",
             "| reference regions | prediction rows | missing predictions | unmatched predictions |",
             "|---:|---:|---:|---:|",
             f"| {inputs['reference_regions']} | {inputs['prediction_rows']} | {inputs['missing_predictions']} "
             f"| {inputs['unmatched_predictions']} |", ""]
    if "caption" in result:
        c = result["caption"]
        lines += ["## Region captioning", "", "| regions | METEOR | CIDEr |", "|---:|---:|---:|",
                  f"| {c['regions']} | {_pct(c['meteor'])} | {_pct(c['cider'])} |", ""]
    if "dense" in result:
        d = result["dense"]
        heads = list(next(iter(d["ap"].values())))
        lines += ["## Dense captioning (DenseCap protocol)", "",
                  f"mAP **{_pct(d['map'])}** (METEOR > 0.05 .. 0.25), detection mAP {_pct(d['det_map'])} "
                  f"(any caption); {d['predictions']} predictions, {d['merged_ground_truth_regions']} ground-truth "
                  f"regions after merging {d['ground_truth_regions']}.", "",
                  "| IoU \\ METEOR | " + " | ".join(f"> {h}" if h != "any" else "any" for h in heads) + " |",
                  "|---|" + "---:|" * len(heads)]
        lines += [f"| {t} | " + " | ".join(_pct(row[h]) for h in heads) + " |" for t, row in d["ap"].items()]
        lines.append("")
    if "attributes" in result:
        a = result["attributes"]
        heads = ["regions", "attributes", "mAP", *a.get("groups", {})]
        cells = [str(a["regions"]), str(a["attributes_evaluated"]), _pct(a["map"]),
                 *map(_pct, a.get("groups", {}).values())]
        lines += ["## Attribute detection", "", "| " + " | ".join(heads) + " |", "|" + "---:|" * len(heads),
                  "| " + " | ".join(cells) + " |", ""]
    if "recognition" in result:
        r = result["recognition"]
        lines += ["## Region recognition", "", "| regions | classes | accuracy | mAP |", "|---:|---:|---:|---:|",
                  f"| {r['regions']} | {r['classes_evaluated']} | {_pct(r['accuracy'])} | {_pct(r['map'])} |", ""]
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """NaN (an AP without positives) becomes null: strict JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer evaluate", description=__doc__.split("\n\n")[0],
                                epilog="Needs `java` for METEOR and the PTB tokenizer (caption, dense).")
    p.add_argument("--predictions", required=True, help="predictions: .parquet file, directory of them, or .jsonl")
    p.add_argument("--prepared", required=True, help="the prepare stage's output directory (its regions/ shards)")
    p.add_argument("--split", help="score only the reference regions of this split")
    p.add_argument("--task", action="append", required=True,
                   help=f"{'|'.join(TASKS)}; repeat or comma-separate for several")
    p.add_argument("--attribute-groups", help="JSON {group: [attribute names]}, e.g. OVAD's head/medium/tail")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix for metrics.json and metrics.md")
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    so = storage_options_from_args(args) or None
    tasks = [t.strip() for arg in args.task for t in arg.split(",") if t.strip()]
    try:
        groups = storage.read_json(args.attribute_groups, so) if args.attribute_groups else None
        result = evaluate(read_predictions(args.predictions, so), read_references(args.prepared, args.split, so),
                          tasks, groups)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    result = _json_safe({"predictions": args.predictions, "prepared": args.prepared, "split": args.split, **result})
    storage.write_bytes(storage.join(args.out, "metrics.json"), json.dumps(result, indent=2).encode(), so)
    storage.write_bytes(storage.join(args.out, "metrics.md"), markdown(result).encode(), so)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
