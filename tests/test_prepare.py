"""The prepare stage: the pure per-image function, then the Ray Data job on a real local cluster (and moto S3)."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dynrefer import storage
from dynrefer.preprocess import PrepareConfig, preprocess_image
from dynrefer.views import crop_views

RNG = np.random.default_rng(0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width, height):
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's first bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def scene(w=160, h=120):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def record(image_id, boxes, w=160, h=120):
    return {"image_id": str(image_id), "file": f"{image_id}.jpg", "width": w, "height": h, "split": "train",
            "regions": [{"region_id": f"{image_id}-{i}", "box": b, "caption": "two red striped circles",
                         "captions": ["two red striped circles"], "category": "circle", "attributes": ["red"]}
                        for i, b in enumerate(boxes)]}


CFG = PrepareConfig(view_size=32)


def test_rows_carry_views_rois_and_hashes_equal_to_imagehash():
    img = scene()
    rows, errors = preprocess_image(record(1, [[10, 20, 50, 60], [100, 30, 150, 110]]), jpeg(img, quality=98), CFG)
    assert errors == [] and len(rows) == 2
    decoded = Image.open(io.BytesIO(jpeg(img, quality=98))).convert("RGB")
    for row in rows:
        assert row["ts"] == [0.0, *CFG.candidate_ts] and len(row["view_boxes"]) == 11 == len(row["phash"])
        assert row["tags"] == ["red", "striped", "circle"]
        views = crop_views(decoded, np.array(row["view_boxes"]), 32)
        assert row["phash"] == [int(str(imagehash.phash(Image.fromarray(v))), 16) for v in views]
        assert row["rois"][0] == [0.0, 0.0, 32.0, 32.0]


def test_bad_boxes_and_bad_images_become_error_rows_and_counts_add_up():
    boxes = [[10, 10, 40, 40], [10, 10, 10, 40], [500, 500, 600, 600], [float("nan"), 0, 5, 5], [-5, -5, 20, 30]]
    rows, errors = preprocess_image(record(2, boxes), png(scene()), CFG)
    assert len(rows) + len(errors) == len(boxes)
    assert [r["region_id"] for r in rows] == ["2-0", "2-4"]
    assert {e["reason"] for e in errors} == {"bad_box"}
    assert any("zero or negative area" in e["message"] for e in errors)
    for data, reason in [(b"", "empty"), (b"not an image at all", "not_image"), (jpeg(scene())[:300], "truncated"),
                         (png_header_only(100_000, 100_000), "too_large"), (None, "missing")]:
        rows, errors = preprocess_image(record(3, boxes[:2]), data, CFG)
        assert rows == [] and [e["reason"] for e in errors] == [reason, reason]
        assert all(e["stage"] == "decode" and e["message"] for e in errors)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_every_image_mode_is_prepared(mode):
    img = scene()
    if mode == "I;16":
        data = png(Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257)))
    elif mode == "CMYK":
        data = jpeg(img.convert("CMYK"))
    else:
        data = png(img.convert(mode))
    rows, errors = preprocess_image(record(4, [[10, 10, 60, 60]]), data, CFG)
    assert errors == [] and len(rows) == 1


# --- the Ray Data job -------------------------------------------------------------------------------------------

def write_vg(root, entries, images, so=None):
    """A Visual Genome v1.2 layout: image_data.json, region_descriptions.json and images/{id}.jpg."""
    storage.write_json(storage.join(root, "image_data.json"),
                       [{"image_id": int(i), "width": w, "height": h, "url": "", "coco_id": None, "flickr_id": None}
                        for i, w, h in images], so)
    storage.write_json(storage.join(root, "region_descriptions.json"), entries, so)


def vg_regions(image_id, boxes):
    return {"id": image_id, "regions": [
        {"region_id": image_id * 100 + i, "image_id": image_id, "phrase": "a small red dotted star",
         "x": b[0], "y": b[1], "width": b[2], "height": b[3]} for i, b in enumerate(boxes)]}


def bad_corpus(root, so=None):
    """12 images: good ones in every mode plus every kind of bad input; returns the expected error reasons."""
    entries, sizes = [], []
    payloads = {}
    for i in range(1, 13):
        img = scene(200 + 10 * i, 150)
        sizes.append((i, img.width, img.height))
        entries.append(vg_regions(i, [[10, 10, 40, 30], [60, 40, 50, 50], [5, 5, 120, 100]]))
        payloads[i] = jpeg(img)
    payloads[2] = png(img.convert("L"))
    payloads[3] = png(img.convert("RGBA"))
    payloads[4] = png(img.convert("P"))
    payloads[5] = jpeg(img.convert("CMYK"))
    payloads[6] = png(Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257))
    payloads[7] = b"\x00garbage" * 50  # corrupt
    payloads[8] = jpeg(img)[:400]  # truncated JPEG
    payloads[9] = png_header_only(200_000, 200_000)  # decompression bomb
    del payloads[10]  # missing file
    entries[10]["regions"][1]["width"] = 0  # zero-area box
    entries[10]["regions"][2]["x"] = 5000  # out of the image
    del entries[11]["regions"][0]["height"]  # broken record
    write_vg(root, entries, sizes, so)
    for i, data in payloads.items():
        storage.write_bytes(storage.join(root, "images", f"{i}.jpg"), data, so)
    return {"not_image": 3, "truncated": 3, "too_large": 3, "missing": 3, "bad_box": 2, "bad_record": 1}


def job_for(root, out, so=None, **kw):
    from pipelines.prepare import PrepareJob

    return PrepareJob(dataset="vg", root=root, out=out, images_per_shard=kw.pop("images_per_shard", 3),
                      prepare=PrepareConfig(view_size=32), storage_options=so or {}, **kw)


@pytest.mark.slow
def test_ray_job_records_every_bad_input_and_resumes(ray_local, tmp_path):
    from pipelines.prepare import run

    root, out = str(tmp_path / "vg"), str(tmp_path / "out")
    expected = bad_corpus(root)
    summary = run(job_for(root, out), progress=False)
    assert summary["input_regions"] == 36 and summary["balanced"]
    assert summary["regions"] + summary["region_errors"] == 36
    reasons = summary["errors_by_reason"]
    assert reasons.get("corrupt", 0) + reasons.get("not_image", 0) == 3
    assert {k: v for k, v in reasons.items() if k not in ("corrupt", "not_image")} == \
        {k: v for k, v in expected.items() if k != "not_image"}
    regions = pq.read_table(os.path.join(out, "regions"))
    assert regions.num_rows == summary["regions"] == 36 - sum(expected.values())
    assert len(set(regions["region_id"].to_pylist())) == regions.num_rows
    assert json.load(open(os.path.join(out, "tags.json")))["tags"][:4] == ["dotted", "red", "small", "star"] or \
        set(json.load(open(os.path.join(out, "tags.json")))["tags"]) == {"small", "red", "dotted", "star"}
    # Resume: remove one shard; a rerun writes only that one and the totals are unchanged.
    os.remove(os.path.join(out, "regions", "shard-00002.parquet"))
    again = run(job_for(root, out), progress=False)
    assert again["shards_written_now"] == 1
    assert {k: again[k] for k in ("regions", "region_errors", "balanced")} == \
        {k: summary[k] for k in ("regions", "region_errors", "balanced")}
    with pytest.raises(ValueError, match="different preparation"):
        run(job_for(root, out, images_per_shard=4), progress=False)


@pytest.mark.slow
def test_ray_job_reads_and_writes_s3(ray_local, s3_server, tmp_path):
    from pipelines.prepare import run

    so = s3_server["storage_options"]
    fs, _ = storage.filesystem("s3://prep", so)
    fs.mkdir("prep")
    bad_corpus("s3://prep/vg", so)
    summary = run(job_for("s3://prep/vg", "s3://prep/out", so), progress=False)
    assert summary["balanced"] and summary["regions"] == 36 - 15
    assert len(storage.listdir("s3://prep/out/regions", so)) == 4
    assert storage.read_json("s3://prep/out/summary.json", so)["regions"] == summary["regions"]


@pytest.mark.slow
def test_killed_job_rerun_writes_only_the_missing_shards(ray_local, tmp_path):
    from pipelines.prepare import run

    root, out = str(tmp_path / "vg"), str(tmp_path / "out")
    entries = [vg_regions(i, [[10, 10, 40, 30], [50, 20, 60, 70]]) for i in range(1, 41)]
    write_vg(root, entries, [(i, 640, 480) for i in range(1, 41)])
    for i in range(1, 41):
        storage.write_bytes(os.path.join(root, "images", f"{i}.jpg"), jpeg(scene(640, 480)))
    config = tmp_path / "job.yaml"
    config.write_text(f"dataset: vg\nroot: {root}\nout: {out}\nimages_per_shard: 1\nworkers: 1\n"
                      f"prepare: {{view_size: 32}}\n")
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.prepare", "--config", str(config), "--quiet",
                             "--address", address], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(storage.listdir(os.path.join(out, "regions"))) < 3 and time.time() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = set(storage.listdir(os.path.join(out, "regions")))
    assert 3 <= len(before) < 40
    summary = run(job_for(root, out, images_per_shard=1, workers=1), progress=False)
    # The killed run's worker can outlive its driver and finish a few more shards beside the rerun.
    assert 1 <= summary["shards_written_now"] <= 40 - len(before)
    regions = pq.read_table(os.path.join(out, "regions"))
    assert regions.num_rows == 80 and len(set(regions["region_id"].to_pylist())) == 80
    assert summary["regions"] == 80 and storage.listdir(os.path.join(out, "plan")) == []


@pytest.mark.slow
def test_a_vg_corpus_of_pngs_is_prepared_whole_and_the_missing_file_has_its_code(ray_local, tmp_path):
    """16-bit, palette, RGBA and gray+alpha PNGs that image_data.json names by url (or not at all) are all
    prepared; the one image without a file is an error row with reason code 'missing' beside its message."""
    from vg_png_corpus import IMAGES, MISSING, write_png_corpus

    from pipelines.prepare import run

    root, out = str(tmp_path / "vg"), str(tmp_path / "out")
    corpus = write_png_corpus(root)
    summary = run(job_for(root, out), progress=False)
    valid = sum(corpus["regions"][i] for i in IMAGES)
    assert summary["balanced"] and summary["regions"] == valid
    assert summary["region_errors"] == corpus["regions"][MISSING] and summary["errors_by_reason"] == {"missing": 1}
    rows = pq.read_table(os.path.join(out, "regions")).to_pylist()
    assert {r["image_id"] for r in rows} == set(IMAGES)
    assert {r["file"] for r in rows} == set(corpus["files"].values())
    [error] = pq.read_table(os.path.join(out, "errors")).to_pylist()
    assert (error["image_id"], error["reason"], error["stage"]) == (MISSING, "missing", "decode")
    assert error["message"].endswith("file not found")


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_prepare", os.path.join(REPO, "benchmarks", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan_peak_mib(root, out):
    child = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "prepare.py"), "--plan-child", root, out],
                           cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_planning_memory_does_not_grow_with_the_corpus(tmp_path):
    """The driver plans 10x the regions (20k -> 200k, VG-layout text, no pixels) at about the same peak RSS: the
    annotations are streamed and each shard goes to its plan file, not into the driver's memory or Ray's items."""
    bench = _bench()
    peaks = {}
    for n in (20_000, 200_000):
        bench.write_annotations(str(tmp_path / f"vg{n}"), n // 50, 50)
        got = _plan_peak_mib(str(tmp_path / f"vg{n}"), str(tmp_path / f"out{n}"))
        assert got["regions"] == n and got["shards"] == -(-(n // 50) // 64)
        peaks[n] = got["peak_rss_mib"]
    # Whole-file parsing held ~1.6 kB per region (861 MiB at 540k): 200k would add ~300 MiB over 20k.
    assert peaks[200_000] < peaks[20_000] * 1.25 and peaks[200_000] - peaks[20_000] < 40, peaks


def test_plan_files_are_the_shards_references(tmp_path):
    """plan_shards writes each shard still to do as out/plan/shard-NNNNN.json.gz holding exactly its records, in
    reading order, and skips the shards already written."""
    from dynrefer import datasets
    from pipelines.prepare import plan_shards, plan_uri, read_plan

    root = str(tmp_path / "vg")
    _bench().write_annotations(root, 10, 3)
    job = job_for(root, str(tmp_path / "out"), images_per_shard=4)
    plan = plan_shards(job, done={"shard-00001.parquet"})
    assert (plan.shards, plan.images, plan.input_regions, plan.todo) == (3, 10, 30, [0, 2])
    records = list(datasets.read_visual_genome(root, record_errors=True))
    assert read_plan(plan_uri(job, 0), None) == records[:4] and read_plan(plan_uri(job, 2), None) == records[8:]
    assert sorted(os.listdir(tmp_path / "out" / "plan")) == ["shard-00000.json.gz", "shard-00002.json.gz"]
