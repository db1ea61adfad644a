"""Model inputs from prepared rows: view choice per mode, crops, RoIs at the model's size, one decode per image."""

import dataclasses
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dynrefer import batching, storage
from dynrefer.batching import (ModelInputs, build_inputs, candidate_indices, choose_views, concat_views,
                               load_images, region_rng, rows_from_columns, share_views, take_regions)
from dynrefer.config import ViewConfig
from dynrefer.phash import select_views
from dynrefer.preprocess import PrepareConfig, preprocess_image
from dynrefer.views import crop_views, region_in_views, view_boxes

RNG = np.random.default_rng(0)
VIEWS = ViewConfig(num_views=3)


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def scene(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def prepared_rows(root, view_size, images=((1, 160, 120), (2, 90, 140))):
    """Rows as the prepare stage writes them, for images stored under ``root`` (two regions per image)."""
    rows = []
    for image_id, w, h in images:
        file = storage.join(str(root), f"{image_id}.jpg")
        if not storage.exists(file):
            storage.write_bytes(file, jpeg(scene(w, h)))
        record = {"image_id": str(image_id), "file": file, "split": "train", "regions": [
            {"region_id": f"{image_id}-{i}", "box": box, "caption": f"a red circle number {i}",
             "captions": [f"a red circle number {i}"]}
            for i, box in enumerate([[5, 7, 40, 50], [30.5, 20.2, w - 3, h - 9]])]}
        out, errors = preprocess_image(record, storage.read_bytes(file), PrepareConfig(view_size=view_size))
        assert errors == []
        rows.extend(out)
    return rows


def test_training_draw_keeps_t0_and_samples_distinct_candidates_uniformly():
    ts = [0.0, *VIEWS.candidate_ts]
    counts, ascending = Counter(), 0
    for i in range(2000):
        chosen = choose_views({"ts": ts}, VIEWS, "train", np.random.default_rng(i))
        assert chosen[0] == 0 and len(chosen) == 3 and len(set(chosen)) == 3
        assert 0 not in chosen[1:]
        counts.update(chosen[1:])
        ascending += chosen[1] < chosen[2]
    assert set(counts) == set(range(1, 11))
    assert max(counts.values()) / min(counts.values()) < 1.3  # each candidate drawn about 400 times
    assert 900 < ascending < 1100  # drawn in random order, as the official code (not sorted by t)


def test_region_generators_repeat_per_sighting_and_differ_between_sightings():
    ts = [0.0, *VIEWS.candidate_ts]
    draw = [choose_views({"ts": ts}, VIEWS, "train", region_rng(0, s, "r1")) for s in range(20)]
    again = [choose_views({"ts": ts}, VIEWS, "train", region_rng(0, s, "r1")) for s in range(20)]
    assert draw == again
    assert len({tuple(d) for d in draw}) > 5
    assert choose_views({"ts": ts}, VIEWS, "train", region_rng(0, 0, "r2")) != draw[0] or \
        choose_views({"ts": ts}, VIEWS, "train", region_rng(0, 1, "r2")) != draw[1]


def test_training_draw_is_limited_to_the_model_candidates():
    cfg = dataclasses.replace(VIEWS, candidate_ts=[0.3, 0.5, 0.8])
    ts = [0.0, *VIEWS.candidate_ts]
    seen = set()
    for i in range(50):
        seen.update(choose_views({"ts": ts}, cfg, "train", np.random.default_rng(i))[1:])
    assert seen == {3, 5, 8}
    with pytest.raises(ValueError, match="4 views need 3 candidates"):
        choose_views({"ts": ts}, dataclasses.replace(cfg, num_views=4, candidate_ts=[0.3, 0.31, 0.5]), "train",
                     np.random.default_rng(0))


def test_phash_mode_is_the_greedy_selection_over_the_candidates(tmp_path):
    for row in prepared_rows(tmp_path, 32):
        assert choose_views(row, VIEWS, "phash") == select_views(row["phash"], row["ts"], 3)
        cfg = dataclasses.replace(VIEWS, candidate_ts=[0.2, 0.4, 0.6, 0.8])
        pool = [0, 2, 4, 6, 8]
        expected = [pool[i] for i in select_views(np.array(row["phash"], dtype=np.uint64)[pool],
                                                   np.array(row["ts"])[pool], 3)]
        assert choose_views(row, cfg, "phash") == expected


def test_fixed_mode_takes_the_nearest_available_t():
    ts = [0.0, 0.25, 0.5, 1.0]
    cfg = dataclasses.replace(VIEWS, fixed_ts=[0.0, 0.4, 0.9])
    assert choose_views({"ts": ts}, cfg, "fixed") == [0, 2, 3]
    with pytest.raises(ValueError, match="fixed_ts"):
        choose_views({"ts": ts}, dataclasses.replace(VIEWS, num_views=2, fixed_ts=[0.5, 1.0]), "fixed")
    # one view may be any t: the full-image RoI-Align baseline of the ablation is the single view t=1
    assert choose_views({"ts": ts}, dataclasses.replace(VIEWS, num_views=1, fixed_ts=[1.0]), "fixed") == [3]
    assert candidate_indices(ts, [0.3, 0.2, 0.9, 1.0]) == [1, 3]


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="numpy Generator"):
        choose_views({"ts": [0.0, 0.5, 1.0]}, VIEWS, "train")
    with pytest.raises(ValueError, match="must be one of"):
        choose_views({"ts": [0.0, 0.5, 1.0]}, VIEWS, "random")
    with pytest.raises(ValueError, match="start with t=0"):
        choose_views({"ts": [0.5, 1.0]}, VIEWS, "fixed")
    with pytest.raises(ValueError, match="one code per prepared view"):
        choose_views({"ts": [0.0, 0.5, 1.0], "phash": [1, 2]}, VIEWS, "phash")


def test_batch_crops_the_chosen_views_and_uses_stored_rois(tmp_path):
    rows = prepared_rows(tmp_path, 32)
    images = load_images(r["file"] for r in rows)
    rngs = [region_rng(7, 0, r["region_id"]) for r in rows]
    inputs = build_inputs(rows, images, VIEWS, 32, "train", rngs, prepared_size=32)
    assert inputs.region_views().shape == (4, 3, 32, 32, 3) and inputs.views.dtype == np.uint8
    assert inputs.rois.shape == (4, 3, 4) and inputs.rois.dtype == np.float32
    for i, row in enumerate(rows):
        chosen = choose_views(row, VIEWS, "train", region_rng(7, 0, row["region_id"]))
        expected = crop_views(images[row["file"]], np.array(row["view_boxes"])[chosen], 32)
        assert np.array_equal(inputs.region_views()[i], expected)
        assert np.array_equal(inputs.rois[i], np.array(row["rois"], dtype=np.float32)[chosen])
        assert inputs.ts[i].tolist() == pytest.approx([row["ts"][j] for j in chosen])
    assert inputs.captions == [r["caption"] for r in rows] and inputs.tags == [r["tags"] for r in rows]
    assert inputs.tags[0] == ["red", "circle"]


def test_rows_prepared_at_another_size_get_rois_recomputed_for_the_model(tmp_path):
    small = prepared_rows(tmp_path, 32)
    large = prepared_rows(tmp_path, 64)
    images = load_images(r["file"] for r in small)
    from_small = build_inputs(small, images, VIEWS, 64, "phash", prepared_size=32)
    chosen = [choose_views(r, VIEWS, "phash") for r in small]
    assert from_small.region_views().shape == (4, 3, 64, 64, 3)
    for i, row in enumerate(small):
        boxes = np.array(row["view_boxes"])[chosen[i]]
        assert np.allclose(from_small.rois[i], region_in_views(row["box"], boxes, 64).astype(np.float32))
        assert not np.allclose(from_small.rois[i], np.array(row["rois"])[chosen[i]])
    # Fixed views pick the same boxes at either size: the same pixels, and the RoIs the prepare stage writes at 64.
    fixed_small = build_inputs(small, images, VIEWS, 64, "fixed", prepared_size=32)
    fixed_large = build_inputs(large, images, VIEWS, 64, "fixed", prepared_size=64)
    assert np.array_equal(fixed_small.region_views(), fixed_large.region_views())
    assert np.allclose(fixed_small.rois, fixed_large.rois, atol=1e-5)
    assert not np.allclose(fixed_small.rois, build_inputs(small, images, VIEWS, 32, "fixed", prepared_size=32).rois)


def test_each_image_is_decoded_once_per_batch(tmp_path, monkeypatch):
    rows = prepared_rows(tmp_path, 32)
    calls = Counter()
    real = batching.decode_image

    def counting(data, max_pixels, name):
        calls[name] += 1
        return real(data, max_pixels=max_pixels, name=name)

    monkeypatch.setattr(batching, "decode_image", counting)
    images = load_images(r["file"] for r in rows)
    assert len(rows) == 4 and len(images) == 2 and set(calls.values()) == {1}


def test_a_changed_image_is_refused(tmp_path):
    rows = prepared_rows(tmp_path, 32)
    storage.write_bytes(rows[0]["file"], jpeg(scene(50, 50)))
    with pytest.raises(ValueError, match="prepare the data again"):
        build_inputs(rows[:1], load_images([rows[0]["file"]]), VIEWS, 32, "fixed", prepared_size=32)


def test_columns_round_trip():
    views = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    inputs = ModelInputs(views=views, view_index=np.array([[0, 1, 3], [2, 1, 3]]), rois=np.ones((2, 3, 4), np.float32),
                         ts=np.zeros((2, 3), np.float32), captions=["a", "b"], tags=[["x"], []], region_ids=["1", "2"])
    columns = inputs.to_columns()
    assert columns["views"].shape == (2, 3, 8, 8, 3)  # Ray Data rows are regions: each carries its views
    back = ModelInputs.from_columns(columns)
    assert back.captions == ["a", "b"] and back.tags == [["x"], []] and back.region_ids == ["1", "2"]
    assert np.array_equal(back.region_views(), inputs.region_views()) and np.array_equal(back.rois, inputs.rois)
    assert len(back.views) == 4 and back.view_index.tolist() == [[0, 1, 2], [3, 1, 2]]  # shared again
    rows = rows_from_columns({"a": np.array([1, 2]), "b": ["x", "y"]})
    assert rows == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def many_regions(root, n=12, w=200, h=150):
    """Prepared rows of ``n`` regions of one image (boxes spread over it, two of them identical)."""
    rng = np.random.default_rng(3)
    boxes = []
    for _ in range(n - 1):
        x, y = rng.integers(0, w - 40), rng.integers(0, h - 40)
        boxes.append([float(x), float(y), float(x + rng.integers(15, 40)), float(y + rng.integers(15, 40))])
    boxes.append(boxes[0])
    file = storage.join(str(root), "many.jpg")
    storage.write_bytes(file, jpeg(scene(w, h)))
    record = {"image_id": "many", "file": file, "split": "val", "regions": [
        {"region_id": f"many-{i}", "box": b, "caption": "a red circle"} for i, b in enumerate(boxes)]}
    rows, errors = preprocess_image(record, storage.read_bytes(file), PrepareConfig(view_size=32))
    assert errors == []
    return rows


@pytest.mark.parametrize("mode", ["fixed", "phash"])
def test_shared_views_index_the_crops_each_region_would_get(tmp_path, mode):
    rows = many_regions(tmp_path) + prepared_rows(tmp_path, 32)
    images = load_images(r["file"] for r in rows)
    inputs = build_inputs(rows, images, VIEWS, 32, mode, prepared_size=32)
    assert inputs.view_index.shape == (len(rows), 3) and inputs.view_index.dtype == np.int64
    boxes = []
    for i, row in enumerate(rows):
        chosen = choose_views(row, VIEWS, mode)
        boxes.append((row["file"], *map(tuple, np.array(row["view_boxes"])[chosen])))
        expected = crop_views(images[row["file"]], np.array(row["view_boxes"])[chosen], 32)
        assert np.array_equal(inputs.region_views()[i], expected)
    distinct = {(f, b) for f, *bs in boxes for b in bs}
    assert len(inputs.views) == len(distinct) < 3 * len(rows)  # one crop per distinct (image, box)
    # Views are never shared across images; within one they are shared exactly when the boxes are equal.
    for (i, a), (j, b) in [((i, a), (j, b)) for i, a in enumerate(boxes) for j, b in enumerate(boxes)]:
        for k in range(3):
            for m in range(3):
                assert (inputs.view_index[i, k] == inputs.view_index[j, m]) == (a[0] == b[0] and a[1 + k] == b[1 + m])
    if mode == "fixed":  # fixed_ts ends with t=1: the whole image, one view per image for every region
        assert len(set(inputs.view_index[:12, 2].tolist())) == 1
        whole = view_boxes(rows[0]["box"], rows[0]["width"], rows[0]["height"], [1.0])[0]
        assert whole.tolist() == [0, 0, rows[0]["width"], rows[0]["height"]]
    assert inputs.view_index[0].tolist() == inputs.view_index[11].tolist()  # the repeated box: all views shared


def test_share_views_merges_equal_pixels_only():
    rng = np.random.default_rng(1)
    distinct = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    distinct[4] = distinct[3]
    distinct[4, 5, 5, 2] ^= 1  # one bit apart from view 3: not the same view
    pick = np.array([[0, 1, 2], [3, 1, 2], [4, 0, 2], [3, 3, 3]])
    views, index = share_views(distinct[pick])
    assert views.shape == (5, 6, 6, 3) and index.shape == (4, 3)
    assert np.array_equal(views[index], distinct[pick])
    assert index.tolist() == [[0, 1, 2], [3, 1, 2], [4, 0, 2], [3, 3, 3]]  # first occurrences keep their order
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    big[1] = big[0]
    big[1, 0, 0, 1] ^= 1  # a byte the bucketing sample skips: the full comparison must still tell them apart
    views, index = share_views(big[[0, 1, 0]])
    assert len(views) == 2 and index.tolist() == [0, 1, 0]
    empty, none = share_views(np.zeros((0, 3, 6, 6, 3), np.uint8))
    assert empty.shape == (0, 6, 6, 3) and none.shape == (0, 3)


def test_concat_and_take_regions_keep_each_region_its_views():
    rng = np.random.default_rng(2)
    a_views, b_views = rng.integers(0, 256, (3, 4, 4, 3), np.uint8), rng.integers(0, 256, (2, 4, 4, 3), np.uint8)
    a_index, b_index = np.array([[0, 2], [1, 2]]), np.array([[0, 1], [1, 1], [0, 0]])
    views, index = concat_views([(a_views, a_index), (b_views, b_index)])
    assert index.tolist() == [[0, 2], [1, 2], [3, 4], [4, 4], [3, 3]]
    per_region = np.concatenate([a_views[a_index], b_views[b_index]])
    assert np.array_equal(views[index], per_region)
    part_views, part_index = take_regions(views, index, slice(1, 4))
    assert len(part_views) == 4 and np.array_equal(part_views[part_index], per_region[1:4])  # view 0 is unused


def test_inputs_travel_as_one_blob_with_each_distinct_view_once(tmp_path):
    rows = prepared_rows(tmp_path, 32)
    inputs = build_inputs(rows, load_images(r["file"] for r in rows), VIEWS, 32, "fixed", prepared_size=32)
    blob = inputs.to_bytes()
    back = ModelInputs.from_bytes(blob)
    for name in ("views", "view_index", "rois", "ts", "view_boxes"):
        assert np.array_equal(getattr(back, name), getattr(inputs, name)), name
        assert getattr(back, name).dtype == getattr(inputs, name).dtype and getattr(back, name).flags.writeable
    assert (back.captions, back.tags, back.region_ids) == (inputs.captions, inputs.tags, inputs.region_ids)
    assert len(inputs.views) < inputs.region_views().shape[0] * 3  # the shared t=1 views are cut once
    assert len(blob) < inputs.region_views().nbytes  # and travel once
