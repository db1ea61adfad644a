"""Caption output files: the schema ``dynrefer caption`` writes its shards in, and the one reader of them.

Evaluation, the demo report and the caption job's own summary all read captions back through
:func:`read_caption_rows`, so that a row means the same thing wherever it is read: Parquet or JSON Lines, one file
or a directory of shards, score maps as dicts.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dynrefer import storage

SCORES = pa.map_(pa.string(), pa.float32())
OUTPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("region_id", pa.string()), ("box", pa.list_(pa.float64(), 4)),
    ("score", pa.float64()), ("detection_category_id", pa.string()),
    ("caption", pa.string()), ("caption_score", pa.float32()),
    ("tags", pa.list_(pa.string())), ("tag_scores", pa.list_(pa.float32())),
    ("category", pa.string()), ("category_score", pa.float32()), ("category_scores", SCORES),
    ("attributes", pa.list_(pa.string())), ("attribute_scores", SCORES),
    ("view_ts", pa.list_(pa.float32())), ("error", pa.string()), ("reason", pa.string()),
])
FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}
SCORE_MAPS = ("category_scores", "attribute_scores")


def encode_rows(rows: list[dict[str, Any]], fmt: str) -> bytes:
    """One shard's bytes: rows in :data:`OUTPUT_SCHEMA` as zstd Parquet, or as JSON Lines."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def read_caption_rows(uri: str, storage_options: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """Rows of a ``.parquet`` or ``.jsonl`` file, or of every such file directly under a directory (in name order;
    other names, such as a half-written temporary, are skipped). Parquet score maps come back as dicts."""
    fs, path = storage.filesystem(uri, storage_options)
    if fs.isdir(path):
        names = [n for n in storage.listdir(uri, storage_options) if n.endswith(tuple(FORMATS.values()))]
        if not names:
            raise FileNotFoundError(f"{uri}: no Parquet or JSON Lines files")
        return [row for n in names for row in _read_file(storage.join(uri, n), storage_options)]
    return _read_file(uri, storage_options)


def _read_file(uri: str, storage_options: storage.StorageOptions | None) -> list[dict[str, Any]]:
    data = storage.read_bytes(uri, storage_options)
    if uri.endswith(".jsonl"):
        return _json_lines(uri, data)
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    for row in rows:
        for key in SCORE_MAPS:
            if isinstance(row.get(key), list):  # a Parquet map reads as (name, score) pairs
                row[key] = dict(row[key])
    return rows


def _json_lines(uri: str, data: bytes) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{uri}: line {n}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{uri}: line {n}: expected a JSON object")
            rows.append(row)
    return rows
