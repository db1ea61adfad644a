"""``dynrefer evaluate`` end to end on a hand-made prepared-regions shard and predictions file."""

import io
import json
import os

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
    assert dense["pairs"] == 30 and dense["ranked_by"] == {"score": 3}

    md = (out / "metrics.md").read_text()
    assert "| 3 | 3 | 1 | 1 |" in md and "| 0.3 | 67.00 | 34.00 |" in md
    assert "Split **test**" in md and "30 pairs" in md and "METEOR > 0 .05" in md
    assert "| 3 | 3 | 61.11 |" in md and "| 3 | 3 | 66.67 | 77.78 |" in md


def test_evaluate_parquet_on_s3(s3_server, monkeypatch):
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
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # credentials never as flags (they show in `ps`)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    rc = evaluate.main(["--predictions", "s3://eval-bucket/preds", "--prepared", "s3://eval-bucket/prep",
                        "--split", "test", "--task", "attributes,recognition", "--out", "s3://eval-bucket/eval",
                        "--s3-endpoint", s3_server["endpoint_url"]])
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


def write_prepared(tmp_path, rows):
    prepared = tmp_path / "prepared"
    storage.write_bytes(str(prepared / "regions" / "shard-00000.parquet"), shard_bytes(rows, REGION_SCHEMA))
    return prepared


def gt_box_predictions(caption_scores):
    """Captions of the test regions' own boxes (no box, no detector score), as `dynrefer caption --prepared`
    writes them; ``caption_scores`` None leaves the column out, as older outputs did."""
    rows = [{"image_id": "1", "region_id": "r1", "caption": "a red car"},
            {"image_id": "1", "region_id": "r2", "caption": "zebra grazing"},
            {"image_id": "2", "region_id": "r3", "caption": "blue sky"}]
    if caption_scores is not None:
        for row, score in zip(rows, caption_scores):
            row["caption_score"] = score
    return rows


@pytest.mark.slow
def test_gt_box_dense_ranks_by_caption_score(caplog):
    refs = [r for r in REGIONS if r["split"] == "test"]
    # by caption score: r2 (.9, METEOR 0), r3 (.5, exact), r1 (.2, exact); 3 positives.
    # caption hits at ranks 2, 3 -> precision 2/3 up to recall 2/3 (67 of 100 points) = .4467;
    # detection hits at 1, 2, 3 -> 1.
    ranked = evaluate.evaluate(gt_box_predictions([0.2, 0.9, 0.5]), refs, ["dense"])["dense"]
    assert ranked["map"] == pytest.approx(0.67 * 2 / 3) and ranked["det_map"] == pytest.approx(1.0)
    assert ranked["ranked_by"] == {"caption_score": 3} and ranked["predictions_without_score"] == 0
    assert "ranked by a constant" not in caplog.text
    # without caption scores (older outputs): a constant, input order r1, r2, r3 -> caption hits at ranks 1, 3:
    # (34 + 33 * 2/3) / 100 = .56, and a warning that says so
    constant = evaluate.evaluate(gt_box_predictions(None), refs, ["dense"])["dense"]
    assert constant["map"] == pytest.approx(0.56) and constant["ranked_by"] == {"constant": 3}
    assert "3 of 3 predictions carry no score or caption_score" in caplog.text
    # a detector's score wins over the caption score under auto; --dense-rank caption_score overrides it
    scored = [{**row, "score": s} for row, s in zip(gt_box_predictions([0.2, 0.9, 0.5]), [0.9, 0.8, 0.7])]
    assert evaluate.evaluate(scored, refs, ["dense"])["dense"]["map"] == pytest.approx(0.56)
    by_caption = evaluate.evaluate(scored, refs, ["dense"], dense_rank="caption_score")["dense"]
    assert by_caption["map"] == pytest.approx(0.67 * 2 / 3) and by_caption["rank"] == "caption_score"
    # Lua compatibility changes nothing here (every prediction overlaps its box) and is recorded
    lua = evaluate.evaluate(gt_box_predictions([0.2, 0.9, 0.5]), refs, ["dense"], densecap_compat="lua")["dense"]
    assert lua["map"] == pytest.approx(ranked["map"]) and lua["compat"] == "lua"


def test_job_file_with_overrides(tmp_path):
    prepared = write_prepared(tmp_path, REGIONS)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps(p) for p in PREDICTIONS) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"predictions: {preds}\nprepared: {prepared}\nsplit: train\ntasks: [attributes, recognition]\n"
                   f"out: {tmp_path / 'from-config'}\n")
    # the command line overrides the file: the test split, one task, another output
    assert evaluate.main(["--config", str(job), "--split", "test", "--task", "recognition",
                          "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert result["split"] == "test" and "attributes" not in result and not (tmp_path / "from-config").exists()
    assert result["recognition"]["accuracy"] == pytest.approx(2 / 3)
    # the file alone: split train has r4 only, which has no prediction
    assert evaluate.main(["--config", str(job)]) == 0
    alone = json.loads((tmp_path / "from-config" / "metrics.json").read_text())
    assert alone["split"] == "train" and alone["inputs"]["missing_predictions"] == 1
    assert "Split **train**" in (tmp_path / "from-config" / "metrics.md").read_text()
    # bad job files are refused with a clear message
    (tmp_path / "bad.yaml").write_text("predictions: x\nprepared: y\ntasks: [caption]\nout: z\nspilt: test\n")
    assert evaluate.main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert evaluate.main(["--predictions", str(preds), "--prepared", str(prepared), "--task", "caption"]) == 2
    assert evaluate.main(["--config", str(job), "--densecap-compat", "none", "--task", "dense,captions"]) == 2


def test_shipped_job_files_build():
    import glob

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "evaluate", "*.yaml")))
    assert len(paths) >= 4
    jobs = {os.path.basename(p): evaluate.EvaluateJob.from_yaml(p) for p in paths}
    assert jobs["synthetic.yaml"].tasks == ["caption", "dense", "attributes", "recognition", "content"]
    assert jobs["synthetic.yaml"].split == "test" and jobs["ovad.yaml"].ovad_annotations


SYNTH_REGIONS = [  # hand-written synthetic-corpus regions, as prepare writes them (tags parsed from the caption)
    {"image_id": "7", "region_id": "701", "split": "test", "box": [0.0, 0.0, 40.0, 40.0],
     "caption": "a small red striped star left of the blue cross", "captions": ["a small red striped star left of "
                                                                                  "the blue cross"],
     "category": "star", "attributes": ["red", "striped", "small"], "tags": ["small", "red", "star", "cross"]},
    {"image_id": "7", "region_id": "702", "split": "test", "box": [60.0, 0.0, 100.0, 40.0],
     "caption": "the blue cross with dots", "captions": ["the blue cross with dots"], "category": "cross",
     "attributes": ["blue", "dotted", "small"], "tags": ["blue", "cross", "dot"]},
]
SYNTH_PREDICTIONS = [
    {"image_id": "7", "region_id": "701", "caption": "a small red striped heart left of the blue cross",
     "tags": ["red", "heart"], "category": "heart", "attributes": ["red", "striped", "small"],
     "attribute_scores": {"red": 0.9, "blue": 0.1, "striped": 0.8, "dotted": 0.2, "small": 0.7, "medium": 0.1},
     "category_scores": {"star": 0.3, "heart": 0.6, "cross": 0.1}},
    {"image_id": "7", "region_id": "702", "caption": "a small blue dotted cross", "tags": ["blue", "cross"],
     "category": "cross", "attributes": ["blue", "dotted"],
     "attribute_scores": {"red": 0.1, "blue": 0.9, "striped": 0.1, "dotted": 0.8, "small": 0.4, "medium": 0.6},
     "category_scores": {"star": 0.1, "heart": 0.1, "cross": 0.8}},
]


def test_content_on_a_synthetic_prediction_file(tmp_path):
    prepared = write_prepared(tmp_path, SYNTH_REGIONS)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps(p) for p in SYNTH_PREDICTIONS) + "\n")
    out = tmp_path / "eval"
    assert evaluate.main(["--predictions", str(preds), "--prepared", str(prepared), "--split", "test",
                          "--task", "content,recognition", "--out", str(out)]) == 0
    c = json.loads((out / "metrics.json").read_text())["content"]
    # 701: the wrong shape (heart for star), the rest right, relation and neighbour right; 702: all four right
    assert {s: v["correct"] for s, v in c["slots"].items()} == pytest.approx(
        {"shape": 0.5, "colour": 1.0, "pattern": 1.0, "size": 1.0, "relation": 1.0, "neighbour": 1.0})
    assert c["all_four"] == pytest.approx(0.5) and c["regions_with_relation"] == 1
    assert c["all_four_size_optional"] == pytest.approx(0.5)
    # tags: predicted red, heart, blue, cross -> red, blue, cross right (3 of 4); reference 4 + 3 = 7
    assert c["tags"]["precision"] == pytest.approx(3 / 4) and c["tags"]["recall"] == pytest.approx(3 / 7)
    assert c["category_accuracy"] == pytest.approx(0.5)
    # attribute scores: 702's best size is medium (.6 > .4), wrong
    assert c["attribute_accuracy"]["size"] == pytest.approx(0.5) and c["attribute_accuracy"]["colour"] == 1.0
    md = (out / "metrics.md").read_text()
    assert "## What the captions say (synthetic corpus)" in md and "| right | 50.00 | 100.00 |" in md
    # references that are not the synthetic corpus's are refused
    assert evaluate.main(["--predictions", str(preds), "--prepared", str(write_prepared(tmp_path / "vg", REGIONS)),
                          "--task", "content", "--out", str(tmp_path / "x")]) == 2


def test_ovad_box_oracle_through_evaluate(tmp_path):
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "ovad", "ovad.json")
    names = [a["name"] for a in json.load(open(fixture))["attributes"]]
    base = {"split": "val", "box": [0.0, 0.0, 10.0, 10.0], "caption": "", "captions": [], "category": "person",
            "attributes": []}
    regions = [{**base, "image_id": "1", "region_id": "a", "attribute_labels": [-1, 1, 1, 0, 1]},
               {**base, "image_id": "1", "region_id": "b", "attribute_labels": [1, 0, 0, -1, 0]},
               {**base, "image_id": "2", "region_id": "c", "attribute_labels": [0, 0, 0, 0, 0]}]
    scores = {"a": [0.9, 0.8, 0.3, 0.6, 0.2], "b": [0.1, 0.9, 0.4, 0.9, 0.1], "c": [0.5, 0.1, 0.5, 0.5, 0.4]}
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"image_id": r["image_id"], "region_id": r["region_id"], "caption": "",
                                         "attribute_scores": dict(zip(names, scores[r["region_id"]]))}) + "\n"
                             for r in regions))
    out = tmp_path / "eval"
    assert evaluate.main(["--predictions", str(preds), "--prepared", str(write_prepared(tmp_path, regions)),
                          "--task", "attributes", "--ovad-annotations", fixture, "--out", str(out)]) == 0
    a = json.loads((out / "metrics.json").read_text())["attributes"]
    # clean (a ignored): b .1 (1), c .5 (0) -> 1/2. white: b .9 (0) above a .8 (1) -> 1/2. black: c .5 (0),
    # b .4 (0), a .3 (1) -> 1/3. wood (b ignored): a .6 (0), c .5 (0), no positive -> left out.
    # stripes: c .4 (0), a .2 (1) -> 1/2.
    assert a["ap"] == pytest.approx({names[0]: 0.5, names[1]: 0.5, names[2]: 1 / 3, names[4]: 0.5})
    assert a["map"] == pytest.approx((0.5 + 0.5 + 1 / 3 + 0.5) / 4)
    groups = a["frequency_groups"]
    assert groups.pop("medium") is None  # its one attribute has no positive: NaN, written as null
    assert groups == pytest.approx({"head": (0.5 + 0.5 + 1 / 3) / 3, "tail": 0.5})
    assert a["type_groups"]["color"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert "OVAD box oracle" in (out / "metrics.md").read_text()
    # label vectors without the vocabulary that names them are refused
    assert evaluate.main(["--predictions", str(preds), "--prepared", str(tmp_path / "prepared"),
                          "--task", "attributes", "--out", str(tmp_path / "x")]) == 2
