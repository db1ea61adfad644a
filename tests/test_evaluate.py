"""``dynrefer evaluate`` end to end on a hand-made prepared-regions shard and predictions file."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynrefer import storage
from pipelines import cli, evaluate
from pipelines.prepare import REGION_SCHEMA

REGIONS = [  # image 1: two regions, image 2: one; image 3 is another split
    {"image_id": "1", "region_id": "r1", "split": "test", "box": [0.0, 0.0, 100.0, 100.0], "caption": "a red car",
     "captions": ["a red car"], "category": "car", "attributes": ["red", "shiny"]},
    {"image_id": "1", "region_id": "r2", "split": "test", "box": [200.0, 0.0, 300.0, 100.0],
     "caption": "a man riding a horse", "captions": ["a man riding a horse"], "category": "person", "attributes": []},
    {"image_id": "2", "region_id": "r3", "split": "test", "box": [0.0, 0.0, 50.0, 50.0], "caption": "blue sky",
     "captions": ["blue sky"], "category": "sky", "attributes": ["blue"]},
    {"image_id": "3", "region_id": "r4", "split": "train", "box": [0.0, 0.0, 50.0, 50.0], "caption": "grass",
     "captions": ["grass"], "category": "grass", "attributes": ["green"]},
]
PREDICTIONS = [  # r3 is missing; the last row matches no region
    {"image_id": "1", "region_id": "r1", "caption": "a red car", "score": 0.9,
     "attribute_scores": {"blue": 0.1, "red": 0.9, "shiny": 0.2},
     "category_scores": {"car": 0.8, "person": 0.1, "sky": 0.1}},
    {"image_id": "1", "region_id": "r2", "caption": "zebra grazing", "score": 0.8,
     "attribute_scores": {"blue": 0.2, "red": 0.3, "shiny": 0.6},
     "category_scores": {"car": 0.1, "person": 0.7, "sky": 0.2}},
    {"image_id": "9", "region_id": "r99", "caption": "grass", "score": 0.5, "box": [0.0, 0.0, 10.0, 10.0],
     "attribute_scores": {"blue": 0.5, "red": 0.5, "shiny": 0.5},
     "category_scores": {"car": 0.5, "person": 0.5, "sky": 0.5}},
]


def shard_bytes(rows, schema=None):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def check_inputs(result):
    assert result["inputs"] == {"reference_regions": 3, "prediction_rows": 3, "error_rows": 0, "missing_predictions": 1,
                                "missing_examples": [["2", "r3"]], "unmatched_predictions": 1}


def check_attributes_and_recognition(result):
    # r3 has no prediction: lowest score for everything.
    # blue: r2 .2 (0), r1 .1 (0), r3 (1) -> 1/3; red: r1 first -> 1; shiny: r2 .6 (0), r1 .2 (1) -> 1/2
    assert result["attributes"]["ap"] == pytest.approx({"blue": 1 / 3, "red": 1.0, "shiny": 0.5})
    assert result["attributes"]["map"] == pytest.approx(11 / 18)
    # r1 car and r2 person right, r3 wrong; AP car 1, person 1, sky (r3 ranked last of 3) 1/3
    assert result["recognition"]["accuracy"] == pytest.approx(2 / 3)
    assert result["recognition"]["map"] == pytest.approx(7 / 9)


@pytest.mark.slow
def test_evaluate_all_tasks_from_jsonl(tmp_path):
    from pycocoevalcap.cider.cider import Cider

    from dynrefer.metrics import ptb_tokenize

    prepared = tmp_path / "prepared"
    storage.write_bytes(str(prepared / "regions" / "shard-00000.parquet"), shard_bytes(REGIONS, REGION_SCHEMA))
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps(p) for p in PREDICTIONS) + "\n")
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", "--predictions", str(preds), "--prepared", str(prepared), "--split", "test",
                   "--task", "caption,dense", "--task", "attributes", "--task", "recognition", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    check_inputs(result)
    check_attributes_and_recognition(result)

    # captions: r3 scored as an empty caption; CIDEr is pycocoevalcap's over the three regions
    refs = {r["region_id"]: r["captions"] for r in REGIONS[:3]}
    gts = ptb_tokenize(refs)
    res = ptb_tokenize({"r1": ["a red car"], "r2": ["zebra grazing"], "r3": [""]})
    assert result["caption"]["regions"] == 3 and result["caption"]["missing_predictions"] == 1
    assert result["caption"]["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])

    # dense, 3 positives, ranked r1 (.9, exact caption), r2 (.8, METEOR 0), r99 (.5, image without regions):
    # any caption: hits 1, 1, 0 -> precision 1 up to recall 2/3 (67 of 100 grid points) -> .67 at every IoU;
    # METEOR > .05 and up: only r1 -> .34
    dense = result["dense"]
    assert dense["det_map"] == pytest.approx(0.67) and dense["map"] == pytest.approx(0.34)
    assert dense["predictions"] == 3 and dense["predictions_on_images_without_ground_truth"] == 1
    assert dense["predictions_without_score"] == 0

    md = (out / "metrics.md").read_text()
    assert "| 3 | 3 | 1 | 1 |" in md and "| 0.3 | 67.00 | 34.00 |" in md
    assert "| 3 | 3 | 61.11 |" in md and "| 3 | 3 | 66.67 | 77.78 |" in md


def test_evaluate_parquet_on_s3(s3_server):
    so = s3_server["storage_options"]
    storage.filesystem("s3://eval-bucket", so)[0].mkdir("eval-bucket")
    storage.write_bytes("s3://eval-bucket/prep/regions/shard-00000.parquet", shard_bytes(REGIONS, REGION_SCHEMA), so)
    scores = pa.map_(pa.string(), pa.float64())  # a Parquet map comes back as (name, score) pairs
    schema = pa.schema([("image_id", pa.string()), ("region_id", pa.string()), ("caption", pa.string()),
                        ("score", pa.float64()), ("box", pa.list_(pa.float64())),
                        ("attribute_scores", scores), ("category_scores", scores)])
    rows = [{**p, "attribute_scores": list(p["attribute_scores"].items()),
             "category_scores": list(p["category_scores"].items())} for p in PREDICTIONS]
    storage.write_bytes("s3://eval-bucket/preds/part-0.parquet", shard_bytes(rows, schema), so)
    rc = evaluate.main(["--predictions", "s3://eval-bucket/preds", "--prepared", "s3://eval-bucket/prep",
                        "--split", "test", "--task", "attributes,recognition", "--out", "s3://eval-bucket/eval",
                        "--s3-endpoint", s3_server["endpoint_url"], "--s3-key", "testing", "--s3-secret", "testing"])
    assert rc == 0
    result = storage.read_json("s3://eval-bucket/eval/metrics.json", so)
    check_inputs(result)
    check_attributes_and_recognition(result)
    assert "caption" not in result and "## Attribute detection" in storage.read_bytes(
        "s3://eval-bucket/eval/metrics.md", so).decode()


def test_bad_input_is_refused(tmp_path, capsys):
    prepared = tmp_path / "prepared"
    storage.write_bytes(str(prepared / "regions" / "shard-00000.parquet"), shard_bytes(REGIONS, REGION_SCHEMA))
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps(PREDICTIONS[0]) + "\n" + json.dumps(PREDICTIONS[0]) + "\n")
    args = ["--predictions", str(preds), "--prepared", str(prepared), "--out", str(tmp_path / "o")]
    assert evaluate.main([*args, "--task", "recognition"]) == 2  # a region predicted twice
    assert evaluate.main([*args, "--task", "captions"]) == 2  # no such task
    preds.write_text(json.dumps(PREDICTIONS[0]) + "\n{not json\n")
    assert evaluate.main([*args, "--task", "recognition"]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--help"])
    assert e.value.code == 0 and "--predictions" in capsys.readouterr().out
