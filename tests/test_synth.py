"""The synthetic corpus: determinism, the Visual Genome v1.2 layout, tight boxes, captions that agree with the
pixels and the geometry, and patterns that the region's own view shows at every object size and the whole image
does not."""

from __future__ import annotations

import itertools
import math
import os
import re
import uuid

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dynrefer import storage, synth
from dynrefer.datasets import read_visual_genome

ANNOTATIONS = ("image_data.json", "region_descriptions.json", "objects.json", "attributes.json")


def tree(root: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under a local directory."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synth") / "corpus")
    summary = synth.write_corpus(root, 12, seed=5, progress=False, workers=1)
    assert summary["images"] == summary["images_written"] == 12 and summary["regions"] >= 36
    return root


def scenes(seed: int = 0, ids: range = range(1, 31)):
    for image_id in ids:
        yield image_id, *synth.render_scene(seed, image_id, with_masks=True)


# --- determinism ------------------------------------------------------------------------------------------------

def test_render_is_deterministic_per_image():
    a_img, a_objs = synth.render_scene(3, 7)
    b_img, b_objs = synth.render_scene(3, 7)
    assert a_img.tobytes() == b_img.tobytes() and a_objs == b_objs
    c_img, c_objs = synth.render_scene(4, 7)
    assert c_img.tobytes() != a_img.tobytes()
    with_masks = synth.render_scene(3, 7, with_masks=True)[1]
    assert [{k: v for k, v in o.items() if k != "mask"} for o in with_masks] == a_objs


def test_corpus_is_byte_identical_whatever_the_workers(corpus, tmp_path):
    again = str(tmp_path / "again")
    synth.write_corpus(again, 12, seed=5, progress=False, workers=3)
    assert tree(again) == tree(corpus)
    other = str(tmp_path / "other")
    synth.write_corpus(other, 12, seed=6, progress=False)
    assert tree(other)["region_descriptions.json"] != tree(corpus)["region_descriptions.json"]


def test_resume_keeps_written_images_and_refuses_another_seed(corpus, tmp_path):
    root = str(tmp_path / "resume")
    synth.write_corpus(root, 12, seed=5, progress=False)
    for name in ("images/2.jpg", "images/9.jpg", "images/12.jpg", "region_descriptions.json", "splits/test.json"):
        os.remove(os.path.join(root, name))
    summary = synth.write_corpus(root, 12, seed=5, progress=False)
    assert (summary["images_written"], summary["images_kept"]) == (3, 9)
    assert tree(root) == tree(corpus)
    with pytest.raises(ValueError, match="seed 5.*refusing"):
        synth.write_corpus(root, 12, seed=6, progress=False)


# --- layout -------------------------------------------------------------------------------------------------------

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_box(item: dict, keys: tuple[str, str, str, str], width: int, height: int) -> None:
    x, y, w, h = (item[k] for k in keys)
    assert all(is_int(v) for v in (x, y, w, h))
    assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= width and y + h <= height


def test_visual_genome_v12_layout(corpus):
    load = {name: storage.read_json(os.path.join(corpus, name)) for name in ANNOTATIONS}
    ids = list(range(1, 13))
    images = load["image_data.json"]
    assert [e["image_id"] for e in images] == ids
    for e in images:
        assert set(e) == {"image_id", "url", "width", "height", "coco_id", "flickr_id"}
        assert e["coco_id"] is None and e["flickr_id"] is None and isinstance(e["url"], str)
        with Image.open(os.path.join(corpus, "images", f"{e['image_id']}.jpg")) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (e["width"], e["height"])
    sizes = {e["image_id"]: (e["width"], e["height"]) for e in images}
    assert sorted(os.listdir(os.path.join(corpus, "images"))) == sorted(f"{i}.jpg" for i in ids)

    regions = load["region_descriptions.json"]
    assert [e["id"] for e in regions] == ids
    for e in regions:
        assert set(e) == {"id", "regions"} and 3 <= len(e["regions"]) <= 15
        for r in e["regions"]:
            assert set(r) == {"region_id", "image_id", "phrase", "x", "y", "width", "height"}
            assert is_int(r["region_id"]) and r["image_id"] == e["id"] and isinstance(r["phrase"], str)
            check_box(r, ("x", "y", "width", "height"), *sizes[e["id"]])
    for name, key in (("objects.json", "objects"), ("attributes.json", "attributes")):
        assert [e["image_id"] for e in load[name]] == ids
        for e, r in zip(load[name], regions):
            assert set(e) == {"image_id", key}
            assert [o["object_id"] for o in e[key]] == [x["region_id"] for x in r["regions"]]
            for o, x in zip(e[key], r["regions"]):
                assert [o[k] for k in "xywh"] == [x[k] for k in ("x", "y", "width", "height")]
                assert len(o["names"]) == 1 and o["names"][0] in synth.SHAPES and o["synsets"] == []
                if key == "attributes":
                    colour, pattern, size = o["attributes"]
                    assert colour in synth.COLOURS and pattern in synth.PATTERNS and size in synth.SIZES
    all_ids = [r["region_id"] for e in regions for r in e["regions"]]
    assert len(set(all_ids)) == len(all_ids)

    meta = storage.read_json(os.path.join(corpus, "synth_meta.json"))
    assert (meta["seed"], meta["num_images"], meta["version"], meta["complete"]) == (5, 12, synth.GENERATOR_VERSION,
                                                                                     True)
    assert meta["vocabulary"] == synth.vocabulary() and meta["regions"] == len(all_ids)
    assert not [n for n in os.listdir(corpus) if n.startswith(".")]  # no scratch left behind


def test_the_dataset_reader_reads_it(corpus):
    records = list(read_visual_genome(corpus, split="train"))
    assert [int(r["image_id"]) for r in records] == storage.read_json(os.path.join(corpus, "splits", "train.json"))
    for record in records:
        _, objects = synth.render_scene(5, int(record["image_id"]))
        assert [r["caption"] for r in record["regions"]] == [o["caption"] for o in objects]
        assert [r["box"] for r in record["regions"]] == [o["box"] for o in objects]
        assert [r["category"] for r in record["regions"]] == [o["shape"] for o in objects]
        assert [r["attributes"] for r in record["regions"]] == [o["attributes"] for o in objects]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 57, 1000])
def test_splits_partition_the_ids(n):
    splits = synth.split_ids(n, seed=0)
    ids = [i for name in ("train", "val", "test") for i in splits[name]]
    assert sorted(ids) == list(range(1, n + 1))
    assert len(splits["test"]) >= 1
    if n >= 3:
        assert len(splits["val"]) >= 1 and len(splits["train"]) >= 1
    if n >= 10:
        assert abs(len(splits["train"]) - 0.8 * n) <= 1 and abs(len(splits["test"]) - 0.1 * n) <= 1
    assert splits == synth.split_ids(n, seed=0) and (n < 10 or splits != synth.split_ids(n, seed=1))


def test_split_files(corpus):
    splits = {name: storage.read_json(os.path.join(corpus, "splits", f"{name}.json"))
              for name in ("train", "val", "test")}
    assert splits == synth.split_ids(12, 5)
    assert sorted(itertools.chain(*splits.values())) == list(range(1, 13))


# --- scenes -------------------------------------------------------------------------------------------------------

def test_vocabularies():
    assert len(synth.SHAPES) >= 10 and len(synth.PATTERNS) >= 5 and len(synth.COLOURS) >= 8
    rgb = np.array(list(synth.COLOURS.values()), dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert distances.min() > 60
    assert set(synth.RELATIONS) == set(synth.RELATION_PHRASES) and len(synth.SIZES) == 4
    vocab = synth.vocabulary()
    assert vocab == sorted(set(vocab)) and all(re.fullmatch(r"[a-z]+", w) for w in vocab)


def test_scenes_vary():
    dims, counts, words = [], set(), set()
    for _, image, objects, in ((i, *synth.render_scene(1, i)) for i in range(1, 41)):
        dims.append(image.size)
        counts.add(len(objects))
        words.update(o["size"] for o in objects)
    widths, heights = zip(*dims)
    assert 320 <= min(widths + heights) and max(widths + heights) <= 1024
    assert max(widths) - min(widths) > 300 and max(heights) - min(heights) > 300
    assert sum(w != h for w, h in dims) >= 35
    assert min(counts) >= 3 and max(counts) <= 15 and len(counts) >= 6
    assert words == set(synth.SIZES)


def test_boxes_are_tight_around_the_drawn_pixels():
    for _, image, objects in scenes(ids=range(1, 16)):
        pixels = np.asarray(image, dtype=np.float64)
        cover = np.zeros(pixels.shape[:2], dtype=int)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            mask = o["mask"]
            assert mask.shape == (y2 - y1, x2 - x1)
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
            cover[y1:y2, x1:x2] += mask
            mean = pixels[y1:y2, x1:x2][mask].mean(axis=0)  # the pattern keeps the colour on average
            assert np.abs(mean - synth.COLOURS[o["colour"]]).max() < 12, o
            assert o["size"] == synth.size_word(o["box"], *image.size)
            assert mask.mean() > 0.3  # a shape fills much of its box
        assert cover.max() == 1  # each pixel belongs to one object at most


def subject(caption: str) -> str:
    """The caption up to its relation phrase."""
    phrases = sorted({p for ps in synth.RELATION_PHRASES.values() for p in ps}, key=len, reverse=True)
    match = re.search(r" (" + "|".join(map(re.escape, phrases)) + r") (a|the) ", caption)
    return caption[:match.start()] if match else caption


def test_captions_name_the_region():
    vocab = set(synth.vocabulary())
    forms, mentions = set(), []
    for _, _, objects in scenes():
        for o in objects:
            caption = o["caption"]
            assert set(caption.split()) <= vocab
            head = subject(caption).split()
            assert o["colour"] in head and o["shape"] in head
            assert o["pattern"] in head or synth.PATTERN_NOUNS.get(o["pattern"]) in head
            assert not set(head) & (set(synth.SIZES) - {o["size"]})
            rel = o["relation"]
            mentions.append(o["mentions_relation"])
            if o["mentions_relation"]:
                tail = caption[len(subject(caption)):]
                assert any(tail.startswith(f" {p} ") for p in synth.RELATION_PHRASES[rel["relation"]])
                assert tail.endswith(f" {rel['colour']} {rel['shape']}")
            else:
                assert subject(caption) == caption
            forms.add(re.sub("|".join(sorted(vocab - {"a", "the", "with", "covered", "in", "that", "is"}, key=len,
                                                reverse=True)), "W", subject(caption)))
    assert 0.35 < np.mean(mentions) < 0.65
    assert len(forms) >= 8  # several phrasings


def test_relations_agree_with_geometry():
    seen = set()
    for _, _, objects in scenes():
        boxes = {o["object_id"]: o["box"] for o in objects}
        for o in objects:
            rel = o["relation"]
            a, b = o["box"], boxes[rel["object_id"]]
            gaps = [max(b[0] - a[2], a[0] - b[2]), max(b[1] - a[3], a[1] - b[3])]
            distance = math.hypot(max(gaps[0], 0), max(gaps[1], 0))
            for other in objects:
                if other is not o:
                    g = [max(other["box"][0] - a[2], a[0] - other["box"][2]),
                         max(other["box"][1] - a[3], a[1] - other["box"][3])]
                    assert distance <= math.hypot(max(g[0], 0), max(g[1], 0))  # the nearest neighbour
            name = rel["relation"]
            seen.add(name)
            if name == "left of":
                assert a[2] <= b[0]
            elif name == "right of":
                assert b[2] <= a[0]
            elif name == "above":
                assert a[3] <= b[1]
            elif name == "below":
                assert b[3] <= a[1]
            elif name == "next to":
                assert gaps[0] < 0 and gaps[1] < 0
            else:
                assert name == "near" and gaps[0] >= 0 and gaps[1] >= 0
    assert seen == set(synth.RELATIONS)


def luminance_spread(view: Image.Image, mask: np.ndarray) -> float | None:
    """Standard deviation of a 64 px view's luminance over the pixels wholly inside ``mask`` (the view's frame,
    bool), one pixel in from its edge; None when no four pixels are: the object is too small to show a surface."""
    cover = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((64, 64), Image.Resampling.BOX))
    inner = ndimage.binary_erosion(cover > 0.999, iterations=1)
    if inner.sum() < 4:
        return None
    return float(np.asarray(view.convert("L"), dtype=np.float64)[inner].std())


def test_patterns_are_legible_in_the_region_view_at_every_size():
    """The t=0 view at the tiny model's 64 px shows every pattern (a swing of 15 grey levels and more) and no
    solid object has one, whatever the object's size: the period scales with the object."""
    checked = {size: 0 for size in synth.SIZES}
    for _, image, objects in scenes(ids=range(1, 41)):
        for o in objects:
            view = image.resize((64, 64), Image.Resampling.BICUBIC, box=tuple(o["box"]))
            spread = luminance_spread(view, o["mask"])
            assert spread is not None, o
            if o["pattern"] == "solid":
                assert spread < 6, o  # the edges of a 14 px ring ring a little when scaled up
            else:
                assert spread > 15, o
                checked[o["size"]] += 1
    assert min(checked.values()) >= 20, checked


def test_pattern_periods_scale_with_the_object():
    for _, image, objects in scenes(ids=range(1, 31)):
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            across = math.sqrt((x2 - x1) * (y2 - y1)) / o["period"]
            assert o["period"] >= 4 and across <= 9.5, o  # at least about 7 px per period in a 64 px t=0 view
            if o["period"] > 4:
                assert across >= 5, o  # and at most about 13 px: several periods across the object


def test_patterns_of_tiny_and_small_objects_blur_away_in_the_whole_image():
    """Shrunk whole to 64 px (the t=1 view), a tiny object shows no surface and most small ones show no pattern:
    the pattern needs the zoomed-in views. (Large objects keep theirs: their t=1 view is much like their t=0.)"""
    spreads: dict[str, list[float]] = {"tiny": [], "small": []}
    for _, image, objects in scenes(ids=range(1, 41)):
        whole = image.resize((64, 64), Image.Resampling.BICUBIC)
        for o in objects:
            if o["size"] not in spreads or o["pattern"] == "solid":
                continue
            x1, y1, x2, y2 = o["box"]
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[y1:y2, x1:x2] = o["mask"]
            spread = luminance_spread(whole, mask)
            spreads[o["size"]].append(0.0 if spread is None else spread)
    assert len(spreads["tiny"]) >= 20 and len(spreads["small"]) >= 20
    assert max(spreads["tiny"]) < 4
    assert np.median(spreads["small"]) < 4 and np.mean(np.array(spreads["small"]) < 8) > 0.8


def test_write_to_s3(s3_server, corpus):
    options = s3_server["storage_options"]
    bucket = f"synth-{uuid.uuid4().hex[:12]}"
    storage.filesystem(f"s3://{bucket}", options)[0].mkdir(bucket)
    uri = f"s3://{bucket}/synth"
    summary = synth.write_corpus(uri, 12, seed=5, storage_options=options, progress=False)
    assert summary["images_written"] == 12
    local = tree(corpus)
    fs, path = storage.filesystem(uri, options)
    remote = {p[len(path) + 1:]: fs.cat_file(p) for p in fs.find(path)}
    assert remote == local
    records = list(read_visual_genome(uri, split="test", storage_options=options))
    assert records and all(r["file"].startswith(f"{uri}/images/") for r in records)
    assert synth.write_corpus(uri, 12, seed=5, storage_options=options, progress=False)["images_kept"] == 12
