"""Bulk captioning on a real local Ray cluster: given boxes and dense captioning (a trained proposer or a detections
file); every region comes out exactly once, also after a rerun, and the output evaluates."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dynrefer import datasets, synth
from dynrefer.checkpoint import save_pretrained
from dynrefer.config import load_config
from dynrefer.model import DynRefer
from dynrefer.preprocess import PrepareConfig
from dynrefer.proposals import fit, load_proposal_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    """A prepared 12-image synthetic corpus and an exported (untrained) tiny model that also names categories and
    attributes."""
    from pipelines.prepare import PrepareJob, run

    root = tmp_path_factory.mktemp("caption")
    synth.write_corpus(str(root / "synth"), 12, seed=3, progress=False)
    run(PrepareJob(dataset="vg", root=str(root / "synth"), out=str(root / "prepared"), images_per_shard=4,
                   prepare=PrepareConfig(view_size=64)), progress=False)
    prepared = pq.read_table(root / "prepared" / "regions", columns=["category", "attributes"]).to_pylist()
    cfg = load_config("tiny")
    cfg.tags.vocabulary = ["red", "blue", "circle", "striped"]
    cfg.recognition.categories = sorted({r["category"] for r in prepared if r["category"]})
    cfg.recognition.attributes = sorted({a for r in prepared for a in r["attributes"]})
    cfg.language.max_new_tokens = 6
    torch.manual_seed(0)
    save_pretrained(DynRefer(cfg), str(root / "model"))
    return root


def job(corpus, out, **kw):
    from pipelines.caption import CaptionJob

    kw.setdefault("prepared", None if "images" in kw else str(corpus / "prepared"))
    return CaptionJob(model=str(corpus / "model"), out=str(out), batch_size=16, **kw)


def evaluate(corpus, predictions, out, tasks):
    """`dynrefer evaluate` on the test split; returns its metrics.json."""
    from pipelines.evaluate import main

    assert main(["--predictions", str(predictions), "--prepared", str(corpus / "prepared"), "--split", "test",
                 "--task", tasks, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_detections_are_validated_entry_by_entry_then_cut_by_score_and_count():
    from dynrefer.detections import attach_detections

    records = [{"image_id": "1", "regions": []}, {"image_id": "a", "regions": []}]
    detections = [
        {"image_id": 1, "bbox": [10, 20, 30, 40], "score": 0.9, "category_id": 3},
        {"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.2},  # under min_score
        {"image_id": "1", "bbox": [1, 2, 3, 4], "score": 0.5},
        {"image_id": 1, "bbox": [2, 2, 3, 3], "score": 0.4},  # beyond max_regions
        {"image_id": 1, "bbox": [1, 2, 3], "score": 0.9},
        {"image_id": 7, "bbox": [1, 2, 3, 4], "score": 0.9},
        {"image_id": "a", "bbox": [1, 2, 0, 4], "score": 0.9},
        {"image_id": "a", "bbox": [1, 2, 3, 4], "score": "high"},
        ["a", [1, 2, 3, 4]],
    ]
    errors = attach_detections(records, detections, "dets.json", min_score=0.3, max_regions=2)
    assert records[0]["regions"] == [
        {"region_id": "1-det0", "box": [10.0, 20.0, 40.0, 60.0], "score": 0.9, "detection_category_id": "3"},
        {"region_id": "1-det2", "box": [1.0, 2.0, 4.0, 6.0], "score": 0.5, "detection_category_id": None}]
    assert records[1]["regions"] == []
    assert [(e["image_id"], e["region_id"]) for e in errors] == [("1", "det-4"), ("7", "det-5"), ("a", "det-6"),
                                                                 ("a", "det-7"), (None, "det-8")]
    assert errors[0]["message"].startswith("dets.json[4]: 'bbox' must be 4 finite numbers")
    assert "image_id 7 is not among the images" in errors[1]["message"]
    assert "zero or negative width" in errors[2]["message"]
    assert "'score' must be a finite number" in errors[3]["message"]
    assert "expected an object, got list" in errors[4]["message"]
    with pytest.raises(ValueError, match="expected a JSON list"):
        attach_detections(records, {"annotations": []}, "dets.json", 0.0, 5)


def test_image_records_of_a_directory_a_list_and_a_coco_file(tmp_path):
    from dynrefer.image_lists import image_records

    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    assert [(r["image_id"], r["file"]) for r in image_records(str(tmp_path))] == [
        ("a", str(tmp_path / "a.jpg")), ("b", str(tmp_path / "b.png"))]
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'b.png'}\n\n{tmp_path / 'a.jpg'}\n")
    assert [r["image_id"] for r in image_records(str(tmp_path / "list.txt"))] == ["b", "a"]
    (tmp_path / "coco.json").write_text(json.dumps({"images": [{"id": 5, "file_name": "a.jpg"}]}))
    assert image_records(str(tmp_path / "coco.json")) == [
        {"image_id": "5", "file": str(tmp_path / "a.jpg"), "split": None, "regions": []}]
    (tmp_path / "dup.txt").write_text(f"{tmp_path / 'a.jpg'}\n{tmp_path / 'x' / 'a.jpg'}\n{tmp_path / 'b.png'}\n")
    assert [r["image_id"] for r in image_records(str(tmp_path / "dup.txt"))] == [
        f"{tmp_path.name}/a.jpg", "x/a.jpg", "b"]
    (tmp_path / "twice.txt").write_text(f"{tmp_path / 'a.jpg'}\n{tmp_path / 'a.jpg'}\n")
    with pytest.raises(ValueError, match="a.jpg is listed twice"):
        image_records(str(tmp_path / "twice.txt"))
    with pytest.raises(ValueError, match="a split needs a Visual Genome root"):
        image_records(str(tmp_path), split="test")


def test_files_sharing_a_stem_get_distinct_ids_that_stay_the_same(tmp_path):
    from dynrefer.image_lists import file_ids, image_records

    for name in ("x.jpg", "x.png", "y.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    records = image_records(str(tmp_path))
    assert [(r["image_id"], os.path.basename(r["file"])) for r in records] == [
        ("x.jpg", "x.jpg"), ("x.png", "x.png"), ("y", "y.jpg")]
    assert image_records(str(tmp_path)) == records
    assert file_ids(["s3://b/p/x.jpg", "s3://b/q/x.jpg", "s3://b/q/x.png"]) == ["p/x.jpg", "q/x.jpg", "q/x.png"]
    with pytest.raises(ValueError, match="names two files"):
        file_ids(["/d/x.png", "/d/x.jpg", "/d/x.png.jpg"])


def test_the_command_line_refuses_contradictory_inputs_before_starting_ray(tmp_path, caplog):
    from pipelines.caption import main

    base = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    assert main([*base, "--images", str(tmp_path)]) == 2
    assert "exactly one box source" in caplog.text
    assert main([*base, "--prepared", str(tmp_path), "--detections", "d.json"]) == 2
    assert "not prepared regions" in caplog.text
    assert main([*base, "--prepared", str(tmp_path), "--input-workers", "0"]) == 2
    assert "input_workers" in caplog.text
    with pytest.raises(SystemExit):
        main([*base, "--images", str(tmp_path), "--proposals", "p", "--detections", "d.json"])


def test_shipped_job_files_are_valid_jobs_and_flags_override_them(tmp_path):
    import glob

    from pipelines.caption import job_from_args, parser

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(repo, "configs", "caption", "*.yaml")))
    assert {os.path.basename(f) for f in files} >= {"synthetic.yaml", "synthetic_dense.yaml"}
    for f in files:
        job_from_args(parser().parse_args(["--config", f]))
    synthetic = os.path.join(repo, "configs", "caption", "synthetic.yaml")
    job = job_from_args(parser().parse_args(["--config", synthetic, "--out", str(tmp_path), "--batch-size", "8"]))
    assert (job.out, job.batch_size, job.split, job.cpus_per_input_worker) == (str(tmp_path), 8, "test", 1.0)
    dense = job_from_args(parser().parse_args(["--config", synthetic, "--images", "imgs", "--detections", "d.json"]))
    assert (dense.prepared, dense.images, dense.detections) == (None, "imgs", "d.json")
    (tmp_path / "typo.yaml").write_text("model: m\nout: o\nprepared: p\nbatchsize: 8\n")
    with pytest.raises(ValueError, match="unknown key"):
        job_from_args(parser().parse_args(["--config", str(tmp_path / "typo.yaml")]))
    with pytest.raises(ValueError, match="--model"):
        job_from_args(parser().parse_args(["--prepared", "p", "--out", "o"]))


@pytest.mark.slow
def test_every_region_is_captioned_exactly_once_and_a_rerun_only_fills_gaps(corpus, tmp_path):
    from pipelines.caption import read_captions, run

    summary = run(job(corpus, tmp_path / "out"), progress=False)
    prepared = pq.read_table(corpus / "prepared" / "regions")
    assert summary["exactly_once"] and summary["errors"] == 0
    assert summary["captioned"] == prepared.num_rows
    rows = read_captions(str(tmp_path / "out"))
    assert all(isinstance(r["caption"], str) and len(r["view_ts"]) == 3 and r["view_ts"][0] == 0.0 for r in rows)
    os.remove(tmp_path / "out" / "captions" / "shard-00001.parquet")
    again = run(job(corpus, tmp_path / "out"), progress=False)
    assert again["shards_written_now"] == 1 and again["exactly_once"]
    assert sorted(r["region_id"] for r in read_captions(str(tmp_path / "out"))) == sorted(r["region_id"] for r in rows)


@pytest.mark.slow
def test_given_boxes_carry_category_and_attributes_that_evaluate(corpus, tmp_path):
    from dynrefer.config import DynReferConfig
    from pipelines.caption import read_captions, run

    cfg = DynReferConfig.from_dict(json.loads((corpus / "model" / "config.json").read_text())).recognition
    summary = run(job(corpus, tmp_path / "out", split="test"), progress=False)
    rows = read_captions(str(tmp_path / "out"))
    assert summary["exactly_once"] and summary["captioned"] == len(rows) > 0
    for r in rows:
        assert sorted(r["category_scores"]) == cfg.categories and sorted(r["attribute_scores"]) == cfg.attributes
        assert r["category"] == max(r["category_scores"], key=r["category_scores"].get)
        assert r["category_score"] == pytest.approx(r["category_scores"][r["category"]])
        assert all(r["attribute_scores"][a] >= cfg.attribute_threshold for a in r["attributes"])
        assert r["score"] is None
    metrics = evaluate(corpus, tmp_path / "out" / "captions", tmp_path / "eval", "attributes,recognition")
    assert metrics["inputs"]["missing_predictions"] == 0
    assert metrics["attributes"]["attributes_evaluated"] > 0 and 0.0 <= metrics["attributes"]["map"] <= 1.0
    assert metrics["recognition"]["regions"] == len(rows) and 0.0 <= metrics["recognition"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_fixed_views_jsonl_and_unreadable_images_become_error_rows(corpus, tmp_path):
    from pipelines.caption import read_captions, run

    test_ids = [r for r in pq.read_table(corpus / "prepared" / "regions").to_pylist() if r["split"] == "test"]
    victim = test_ids[0]["file"]
    saved = open(victim, "rb").read()
    open(victim, "wb").write(b"gone")
    try:
        summary = run(job(corpus, tmp_path / "out", split="test", views="fixed", format="jsonl"), progress=False)
    finally:
        open(victim, "wb").write(saved)
    rows = read_captions(str(tmp_path / "out"), "jsonl")
    lost = [r for r in test_ids if r["file"] == victim]
    assert summary["exactly_once"] and summary["errors"] == len(lost) > 0
    assert summary["captioned"] + summary["errors"] == len(test_ids)
    assert all(r["view_ts"] == [0.0, 0.5, 1.0] for r in rows if not r["error"])
    assert all(r["error"].startswith(f"{victim}: not an image") for r in rows if r["error"])


def held_out_image(corpus):
    """The test split's one image record and its size."""
    record = next(datasets.read_visual_genome(str(corpus / "synth"), split="test"))
    return record, Image.open(record["file"]).size


@pytest.mark.slow
def test_dense_captioning_with_a_trained_proposer(corpus, tmp_path):
    from pipelines.caption import read_captions, run

    train = list(datasets.read_visual_genome(str(corpus / "synth"), split="train"))
    cfg = load_proposal_config("tiny")
    cfg.min_size, cfg.max_size, cfg.train.batch_size = 128, 192, 2  # fast, not good
    fit(train[:4], cfg, steps=2).proposer.save(str(tmp_path / "proposer"))
    record, (width, height) = held_out_image(corpus)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "images.txt").write_text(f"{record['file']}\n{tmp_path / 'broken.jpg'}\n")
    dense = job(corpus, tmp_path / "out", images=str(tmp_path / "images.txt"), proposals=str(tmp_path / "proposer"),
                max_regions=5, images_per_shard=1, cpus_per_actor=0.5, cpus_per_proposer=0.5)
    summary = run(dense, progress=False)
    rows = read_captions(str(tmp_path / "out"))
    regions = [r for r in rows if not r["error"]]
    assert summary["exactly_once"] and summary["images"] == 2 and summary["images_with_regions"] == 1
    assert summary["captioned"] == len(regions) == 5 and summary["errors"] == 1
    [broken] = [r for r in rows if r["error"]]
    assert broken["image_id"] == "broken" and broken["region_id"] is None and "broken.jpg" in broken["error"]
    scores = [r["score"] for r in regions]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for r in regions:
        x1, y1, x2, y2 = r["box"]
        assert r["image_id"] == record["image_id"] and 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert isinstance(r["caption"], str) and r["category"] in r["category_scores"]
    metrics = evaluate(corpus, tmp_path / "out" / "captions", tmp_path / "eval", "dense")
    assert metrics["dense"]["predictions"] == 5 and 0.0 <= metrics["dense"]["det_map"] <= 1.0
    os.remove(tmp_path / "out" / "captions" / "shard-00000.parquet")
    again = run(dense, progress=False)
    assert again["shards_written_now"] == 1 and again["exactly_once"]
    assert sorted(r["region_id"] for r in read_captions(str(tmp_path / "out")) if r["region_id"]) == \
        sorted(r["region_id"] for r in regions)


@pytest.mark.slow
def test_dense_captioning_from_a_detections_file_with_a_malformed_entry(corpus, tmp_path):
    from pipelines.caption import read_captions, run

    record, (width, height) = held_out_image(corpus)
    truth = record["regions"]
    detections = [{"image_id": int(record["image_id"]), "score": 1.0 - 0.01 * i, "category_id": 1,
                   "bbox": [r["box"][0], r["box"][1], r["box"][2] - r["box"][0], r["box"][3] - r["box"][1]]}
                  for i, r in enumerate(truth)]
    detections.append({"image_id": int(record["image_id"]), "bbox": [1, 2], "score": 0.5})
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    summary = run(job(corpus, tmp_path / "out", images=str(corpus / "synth"), split="test", format="jsonl",
                      detections=str(tmp_path / "detections.json")), progress=False)
    rows = read_captions(str(tmp_path / "out"), "jsonl")
    assert summary["exactly_once"] and summary["captioned"] == len(truth) and summary["errors"] == 1
    [bad] = [r for r in rows if r["error"]]
    assert bad["region_id"] == f"det-{len(truth)}" and f"detections.json[{len(truth)}]: 'bbox'" in bad["error"]
    given = {f"{record['image_id']}-det{i}": r["box"] for i, r in enumerate(truth)}
    for r in rows:
        if not r["error"]:
            assert r["box"] == pytest.approx(given[r["region_id"]]) and r["detection_category_id"] == "1"
            assert r["caption"] is not None and r["category"] is not None and r["score"] > 0.8
    metrics = evaluate(corpus, tmp_path / "out" / "captions", tmp_path / "eval", "dense")
    assert metrics["inputs"]["error_rows"] == 1 and metrics["dense"]["predictions"] == len(truth)
    assert metrics["dense"]["det_map"] > 0.9  # the reference boxes themselves


@pytest.mark.slow
def test_same_stem_images_are_captioned_apart_and_error_rows_carry_reason_codes(corpus, tmp_path):
    """`dynrefer caption --images DIR` with x.jpg and x.png (once a traceback): both captioned under distinct ids;
    an unreadable file and a malformed detection are error rows with a reason code beside the message; every row
    has a caption_score column (None until the model gives one)."""
    from pipelines.caption import main, read_captions

    record, _ = held_out_image(corpus)
    images = tmp_path / "images"
    images.mkdir()
    with Image.open(record["file"]) as img:
        img.convert("RGB").save(images / "x.jpg", quality=95)
        img.convert("P").save(images / "x.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    detections = [{"image_id": i, "bbox": [4, 6, 30, 24], "score": 0.9} for i in ("x.jpg", "x.png", "broken")]
    detections.append({"image_id": "x.png", "bbox": [4, 6], "score": 0.9})
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    code = main(["--model", str(corpus / "model"), "--images", str(images), "--detections",
                 str(tmp_path / "detections.json"), "--out", str(tmp_path / "out"), "--quiet", "--batch-size", "8",
                 "--cpus-per-actor", "0.5", "--cpus-per-input-worker", "0.5"])
    assert code == 0
    rows = read_captions(str(tmp_path / "out"))
    good = {r["image_id"]: r for r in rows if not r["error"]}
    assert set(good) == {"x.jpg", "x.png"} and all(isinstance(r["caption"], str) for r in good.values())
    errors = {r["image_id"]: r for r in rows if r["error"]}
    assert errors["broken"]["reason"] == "not_image" and "broken.jpg" in errors["broken"]["error"]
    assert errors["x.png"]["reason"] == "bad_detection" and "'bbox'" in errors["x.png"]["error"]
    assert all(r["reason"] is None for r in good.values())
    table = pq.read_table(tmp_path / "out" / "captions")
    assert {"caption_score", "reason"} <= set(table.column_names)
    assert all(s is None or 0.0 <= s <= 1.0 for s in table["caption_score"].to_pylist())


@pytest.mark.slow
def test_a_vg_corpus_of_pngs_is_dense_captioned_whole(corpus, tmp_path):
    """16-bit, palette, RGBA and gray+alpha PNGs that image_data.json names are all captioned; only the image with
    no file is an error row, coded 'missing'."""
    from vg_png_corpus import IMAGES, MISSING, write_png_corpus

    from pipelines.caption import read_captions, run

    root = tmp_path / "vg"
    write_png_corpus(str(root))
    records = {r["image_id"]: r for r in datasets.read_visual_genome(str(root))}
    detections = [{"image_id": int(i), "score": 0.9, "bbox": [r["box"][0], r["box"][1], r["box"][2] - r["box"][0],
                                                             r["box"][3] - r["box"][1]]}
                  for i, rec in records.items() for r in rec["regions"]]
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    summary = run(job(corpus, tmp_path / "out", images=str(root), split="test",
                      detections=str(tmp_path / "detections.json"), cpus_per_actor=0.5), progress=False)
    rows = read_captions(str(tmp_path / "out"))
    captioned = [r for r in rows if not r["error"]]
    assert summary["exactly_once"] and summary["images"] == len(IMAGES) + 1
    assert {r["image_id"] for r in captioned} == set(IMAGES)
    assert len(captioned) == sum(len(records[i]["regions"]) for i in IMAGES)
    [missing] = [r for r in rows if r["error"]]
    assert (missing["image_id"], missing["reason"]) == (MISSING, "missing")
