import json
import os
import pickle
import shutil
import uuid

import pytest
from PIL import Image

from dynrefer import datasets, storage
from dynrefer.datasets import (make_region, ovad_attributes, read_coco_instances, read_ovad, read_refcocog,
                               read_visual_genome, restricted_unpickle)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _dataset(tmp_path, name: str, images: dict[str, tuple[int, int]]) -> str:
    """Copy a fixture folder into tmp_path and draw its images (relative path -> size) there."""
    root = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), root)
    for rel, size in images.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", size, (120, 60, 30)).save(path)
    return root


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _region(region_id, box, caption=None, captions=None, category=None, attributes=(), labels=()):
    return {"region_id": region_id, "box": box, "caption": caption,
            "captions": captions if captions is not None else ([caption] if caption else []),
            "category": category, "attributes": list(attributes), "attribute_labels": list(labels)}


# --- record type ----------------------------------------------------------------------------------------------------

def test_make_region_defaults():
    assert make_region(5, [1, 2, 3, 4], "a dog") == _region("5", [1.0, 2.0, 3.0, 4.0], "a dog")
    assert make_region("r", [0, 0, 1, 1])["captions"] == []
    assert set(datasets.ImageRecord.__annotations__) == {"image_id", "file", "width", "height", "regions", "split"}


# --- Visual Genome --------------------------------------------------------------------------------------------------

VG_IMAGES = {"images/VG_100K/1.jpg": (64, 48), "images/VG_100K_2/2.jpg": (40, 30)}


def _vg_expected(root: str, split=(None, None, None)):
    return [
        {"image_id": "1", "file": os.path.join(root, "images", "VG_100K", "1.jpg"), "width": 64, "height": 48,
         "split": split[0], "regions": [
            _region("11", [4.0, 5.0, 24.0, 15.0], "the clock is green", category="clock",
                    attributes=["green", "tall"]),
            _region("12", [30.0, 20.0, 60.0, 40.0], "white clouds in blue sky"),
        ]},
        {"image_id": "2", "file": os.path.join(root, "images", "VG_100K_2", "2.jpg"), "width": 40, "height": 30,
         "split": split[1], "regions": [
            _region("21", [2.0, 1.0, 2.0, 9.0], "a thin pole"),
            _region("22", [1.0, 3.5, 11.5, 11.5], "man wearing red shirt", category="man"),
        ]},
        {"image_id": "3", "file": os.path.join(root, "images", "3.jpg"), "width": 32, "height": 32,
         "split": split[2], "regions": []},
    ]


def test_visual_genome_all(tmp_path):
    # No split asked for: every image is read, labelled from the split files under splits/.
    root = _dataset(tmp_path, "vg", VG_IMAGES)
    assert list(read_visual_genome(root)) == _vg_expected(root, split=("train", "train", "val"))


def test_visual_genome_flat_images_dir_and_no_objects(tmp_path):
    root = _dataset(tmp_path, "vg", {"images/1.jpg": (64, 48), "VG_100K_2/2.jpg": (40, 30)})
    records = list(read_visual_genome(root, use_objects=False))
    assert [r["file"] for r in records] == [os.path.join(root, "images", "1.jpg"),
                                            os.path.join(root, "VG_100K_2", "2.jpg"),
                                            os.path.join(root, "images", "3.jpg")]
    assert all(reg["category"] is None and reg["attributes"] == [] for r in records for reg in r["regions"])


def test_visual_genome_objects_json_fallback(tmp_path):
    root = _dataset(tmp_path, "vg", VG_IMAGES)
    with open(os.path.join(root, "attributes.json")) as f:
        data = json.load(f)
    os.remove(os.path.join(root, "attributes.json"))
    objects = [{"image_id": e["image_id"], "objects": [{k: v for k, v in o.items() if k != "attributes"}
                                                        for o in e["attributes"]]} for e in data]
    with open(os.path.join(root, "objects.json"), "w") as f:
        json.dump(objects, f)
    first = next(read_visual_genome(root))
    assert first["regions"][0]["category"] == "clock" and first["regions"][0]["attributes"] == []


def test_visual_genome_split_directory(tmp_path):
    root = _dataset(tmp_path, "vg", VG_IMAGES)
    expected = _vg_expected(root, split=("train", "train", "val"))
    assert list(read_visual_genome(root, split="train")) == expected[:2]
    assert list(read_visual_genome(root, split="val")) == expected[2:]


def test_visual_genome_densecap_split_file(tmp_path):
    root = _dataset(tmp_path, "vg", VG_IMAGES)
    split_file = os.path.join(root, "densecap_splits.json")
    expected = _vg_expected(root, split=("train", "val", "test"))
    assert list(read_visual_genome(root, split_file=split_file)) == expected
    assert list(read_visual_genome(root, split="val", split_file=split_file)) == [expected[1]]
    with pytest.raises(ValueError, match=r"densecap_splits\.json.*'bogus' missing"):
        list(read_visual_genome(root, split="bogus", split_file=split_file))


def test_visual_genome_finds_the_png_files_image_data_names(tmp_path):
    """A VG-layout corpus of PNGs (16-bit, palette, RGBA, gray+alpha): each image's file is the one its url names
    (full VG url, a relative path not named for the id, a url whose .jpg is really a .png), or {id} with any
    suffix when image_data gives no url; each decodes at its annotated size. Only the absent file is missing."""
    from vg_png_corpus import IMAGES, MISSING, write_png_corpus

    from dynrefer.imageio import decode_image

    corpus = write_png_corpus(str(tmp_path / "vg"))
    records = {r["image_id"]: r for r in read_visual_genome(str(tmp_path / "vg"))}
    assert set(records) == {*IMAGES, MISSING}
    for image_id, path in corpus["files"].items():
        record = records[image_id]
        assert record["file"] == path, image_id
        with open(record["file"], "rb") as f:
            assert decode_image(f.read()).size == (record["width"], record["height"])
        assert len(record["regions"]) == corpus["regions"][image_id] and record["split"] == "test"
    assert records[MISSING]["file"] == str(tmp_path / "vg" / "images" / f"{MISSING}.jpg")
    assert not os.path.exists(records[MISSING]["file"])


def test_visual_genome_relative_urls_never_reach_above_the_root(tmp_path):
    root = _dataset(tmp_path, "vg", {"images/1.jpg": (64, 48)})
    os.makedirs(tmp_path / "outside")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "2.jpg")
    _edit_json(os.path.join(root, "image_data.json"), lambda d: d[1].update(url="../outside/2.jpg"))
    files = {r["image_id"]: r["file"] for r in read_visual_genome(root)}
    assert files["1"] == os.path.join(root, "images", "1.jpg")
    assert files["2"] == os.path.join(root, "images", "2.jpg")  # not ../outside/2.jpg: missing, as it is


@pytest.mark.parametrize("file, edit, message", [
    ("region_descriptions.json", lambda d: d[1]["regions"][0].pop("width"),
     r"region_descriptions\.json: regions\[0\] of image 2: field 'width' missing"),
    ("region_descriptions.json", lambda d: d[0]["regions"][1].update(x="30"),
     r"region_descriptions\.json: regions\[1\] of image 1: field 'x' must be a number, got str '30'"),
    ("region_descriptions.json", lambda d: d[0]["regions"][1].update(phrase=None),
     r"region_descriptions\.json: regions\[1\] of image 1: field 'phrase' must be a string"),
    ("region_descriptions.json", lambda d: d[2].pop("regions"),
     r"region_descriptions\.json: image 3: field 'regions' missing"),
    ("region_descriptions.json", lambda d: d[0].pop("id"),
     r"region_descriptions\.json: entry 0: field 'id' missing"),
    ("image_data.json", lambda d: d[1].update(width=40.5),
     r"image_data\.json: image 2: field 'width' must be an integer"),
    ("attributes.json", lambda d: d[0]["attributes"][0].update(names="clock"),
     r"attributes\.json: attributes\[0\] of image 1: field 'names' must be a list"),
    ("attributes.json", lambda d: d[0]["attributes"][1].pop("h"),
     r"attributes\.json: attributes\[1\] of image 1: field 'h' missing"),
    ("splits/train.json", lambda d: d.append([3]),
     r"train\.json: split 'train'\[2\]: image id must be an integer or string"),
])
def test_visual_genome_malformed(tmp_path, file, edit, message):
    root = _dataset(tmp_path, "vg", VG_IMAGES)
    _edit_json(os.path.join(root, file), edit)
    with pytest.raises(ValueError, match=message):
        list(read_visual_genome(root, split="train" if file.startswith("splits/") else None))


def test_visual_genome_broken_json(tmp_path):
    root = _dataset(tmp_path, "vg", VG_IMAGES)
    with open(os.path.join(root, "image_data.json"), "w") as f:
        f.write('[{"image_id": 1,')
    with pytest.raises(ValueError, match=r"image_data\.json: invalid JSON"):
        list(read_visual_genome(root))
    with open(os.path.join(root, "image_data.json"), "w") as f:
        f.write('{"image_id": 1}')
    with pytest.raises(ValueError, match=r"image_data\.json: top level: expected a list"):
        list(read_visual_genome(root))


def test_visual_genome_objects_in_another_order_than_the_regions(tmp_path):
    """attributes.json is streamed in step with region_descriptions.json; when the two list images in different
    orders (or one lacks an image) every region still gets its own image's objects."""
    root = _dataset(tmp_path, "vg", VG_IMAGES)
    _edit_json(os.path.join(root, "attributes.json"), lambda d: d.reverse())
    assert list(read_visual_genome(root)) == _vg_expected(root, split=("train", "train", "val"))
    _edit_json(os.path.join(root, "attributes.json"), lambda d: d.pop())  # image 1's objects, now last, gone
    got = list(read_visual_genome(root))
    assert got[0]["regions"][0]["category"] is None and got[1] == _vg_expected(root, ("train", "train", "val"))[1]


def test_annotation_arrays_are_streamed_not_loaded(tmp_path):
    """A truncated region_descriptions.json yields its complete entries before the error (the whole-file parser
    yields none): the reader holds one entry at a time."""
    from dynrefer.datasets import iter_json_array

    path = tmp_path / "a.json"
    path.write_text('[{"id": 1, "regions": []}, {"id": 2, "regions": [{"x": 1.5}]}, {"id": 3, "reg')
    got = []
    with pytest.raises(ValueError, match=r"a\.json: invalid JSON"):
        for entry in iter_json_array(str(path)):
            got.append(entry)
    assert got == [{"id": 1, "regions": []}, {"id": 2, "regions": [{"x": 1.5}]}]
    assert type(got[1]["regions"][0]["x"]) is float and type(got[0]["id"]) is int


# --- RefCOCOg -------------------------------------------------------------------------------------------------------

def _refcocog_expected(folder: str):
    return [
        {"image_id": "9", "file": os.path.join(folder, "COCO_train2014_000000000009.jpg"), "width": 64,
         "height": 48, "split": "train", "regions": [
            _region("0", [2.5, 3.0, 22.5, 13.0], "a man at the caf\u00e9",
                    ["a man at the caf\u00e9", "person on left"], category="person"),
            _region("1", [30.0, 10.0, 50.0, 40.0], "brown dog \u2013 sleeping", category="dog"),
        ]},
        {"image_id": "25", "file": os.path.join(folder, "COCO_train2014_000000000025.jpg"), "width": 40,
         "height": 40, "split": "val", "regions": [
            _region("2", [0.0, 0.0, 40.0, 20.0], "the dog", ["the dog", "caf\u00e9 dog"], category="dog"),
        ]},
    ]


def test_refcocog(tmp_path):
    root = _dataset(tmp_path, "refcocog", {"train2014/COCO_train2014_000000000009.jpg": (64, 48)})
    expected = _refcocog_expected(os.path.join(root, "train2014"))
    assert list(read_refcocog(root)) == expected
    assert list(read_refcocog(root, split="val")) == expected[1:]
    assert list(read_refcocog(root, split="test")) == []


def test_refcocog_image_folders(tmp_path):
    root = _dataset(tmp_path, "refcocog", {"images/COCO_train2014_000000000025.jpg": (40, 40)})
    assert next(read_refcocog(root))["file"].startswith(os.path.join(root, "images") + os.sep)
    assert next(read_refcocog(root, image_root="s3://coco/train2014"))["file"] == \
        "s3://coco/train2014/COCO_train2014_000000000009.jpg"


def test_refcocog_python3_pickle(tmp_path):
    root = _dataset(tmp_path, "refcocog", {})
    refs = restricted_unpickle(open(os.path.join(root, "refs(umd).p"), "rb").read())
    with open(os.path.join(root, "refs(umd).p"), "wb") as f:
        pickle.dump(refs, f, protocol=4)
    assert list(read_refcocog(root)) == _refcocog_expected(os.path.join(root, "images"))


@pytest.mark.parametrize("edit, message", [
    (lambda refs: refs[1].pop("ann_id"), r"refs\(umd\)\.p: ref 1: field 'ann_id' missing"),
    (lambda refs: refs[0].update(ann_id=5), r"refs\(umd\)\.p: ref 0: field 'ann_id' = 5 is not an annotation"),
    (lambda refs: refs[2]["sentences"][0].pop("sent") and refs[2]["sentences"][0].pop("raw"),
     r"refs\(umd\)\.p: sentences\[0\] of ref 2: field 'sent' missing"),
    (lambda refs: refs[0].update(sentences="a man"), r"refs\(umd\)\.p: ref 0: field 'sentences' must be a list"),
    (lambda refs: refs[1].update(category_id=7), r"refs\(umd\)\.p: ref 1: field 'category_id' = 7 is not in"),
])
def test_refcocog_malformed_refs(tmp_path, edit, message):
    root = _dataset(tmp_path, "refcocog", {})
    path = os.path.join(root, "refs(umd).p")
    refs = restricted_unpickle(open(path, "rb").read())
    edit(refs)
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(ValueError, match=message):
        list(read_refcocog(root))


def test_refcocog_malformed_instances(tmp_path):
    root = _dataset(tmp_path, "refcocog", {})
    _edit_json(os.path.join(root, "instances.json"), lambda d: d["annotations"][2].update(bbox=[0, 0, 40]))
    with pytest.raises(ValueError, match=r"instances\.json: annotation 1003: field 'bbox' must be 4 numbers"):
        list(read_refcocog(root))


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": 1}, _Exploit(str(marker))], protocol=2)
    with pytest.raises(ValueError, match=r"evil\.p: refused or unreadable pickle.*(posix|os|nt)\.system"):
        restricted_unpickle(payload, "evil.p")
    assert not marker.exists()

    root = _dataset(tmp_path, "refcocog", {})
    with open(os.path.join(root, "refs(umd).p"), "wb") as f:
        f.write(payload)
    with pytest.raises(ValueError, match=r"refs\(umd\)\.p: refused"):
        list(read_refcocog(root))
    assert not marker.exists()


@pytest.mark.parametrize("obj", [eval, {"a": {1, 2}}, Image.new("L", (1, 1)), b"raw bytes"])
def test_restricted_unpickler_refuses_other_globals(obj):
    with pytest.raises(ValueError, match="refused or unreadable pickle"):
        restricted_unpickle(pickle.dumps(obj, protocol=2))


def test_restricted_unpickler_allows_plain_data():
    value = {"a": [1, 2.5, ("x", -3)], "b": {"c": None, "d": True}}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert restricted_unpickle(pickle.dumps(value, protocol=protocol)) == value
    with pytest.raises(ValueError, match="refused or unreadable"):
        restricted_unpickle(b"\x80\x02}q\x00(")


# --- COCO -----------------------------------------------------------------------------------------------------------

def test_coco_instances(tmp_path):
    root = _dataset(tmp_path, "coco", {})
    ann = os.path.join(root, "instances.json")
    images = os.path.join(root, "val2017")
    expected = [
        {"image_id": "139", "file": os.path.join(images, "000000000139.jpg"), "width": 64, "height": 48,
         "split": "val", "regions": [_region("1", [1.0, 2.0, 11.0, 22.0], category="chair"),
                                     _region("2", [20.25, 5.5, 50.25, 15.5], category="person")]},
        {"image_id": "285", "file": os.path.join(images, "000000000285.jpg"), "width": 32, "height": 40,
         "split": "val", "regions": [_region("4", [3.0, 4.0, 8.0, 10.0], category="bear")]},
        {"image_id": "632", "file": os.path.join(images, "000000000632.jpg"), "width": 40, "height": 40,
         "split": "val", "regions": []},
    ]
    assert list(read_coco_instances(ann, images, split="val")) == expected
    with_crowd = list(read_coco_instances(ann, images, include_crowd=True))
    assert [r["region_id"] for r in with_crowd[0]["regions"]] == ["1", "2", "3"]
    assert with_crowd[0]["split"] is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][1].update(category_id=99), r"annotation 2: field 'category_id' = 99 is not in"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, "10", 20]), r"annotation 1: field 'bbox' must be 4 numbers"),
    (lambda d: d["annotations"][3].update(image_id=7), r"annotation 4: field 'image_id' = 7 is not in 'images'"),
    (lambda d: d["images"][2].pop("file_name"), r"image 632: field 'file_name' missing"),
    (lambda d: d.pop("categories"), r"top level: field 'categories' missing"),
    (lambda d: d["categories"][0].update(name=1), r"categories\[0\]: field 'name' must be a string"),
])
def test_coco_malformed(tmp_path, edit, message):
    root = _dataset(tmp_path, "coco", {})
    ann = os.path.join(root, "instances.json")
    _edit_json(ann, edit)
    with pytest.raises(ValueError, match=r"instances\.json: " + message):
        list(read_coco_instances(ann, root))


# --- OVAD -----------------------------------------------------------------------------------------------------------

def test_ovad(tmp_path):
    root = _dataset(tmp_path, "ovad", {})
    ann = os.path.join(root, "ovad.json")
    expected = [
        {"image_id": "69356", "file": os.path.join(root, "000000069356.jpg"), "width": 64, "height": 48,
         "split": "val", "regions": [
            _region("2309", [5.5, 6.0, 25.5, 36.0], category="zebra",
                    attributes=["color:white", "color:black", "pattern:has stripes/stripes"], labels=[-1, 1, 1, 0, 1]),
            _region("2310", [30.0, 2.0, 40.0, 12.0], category="person", attributes=["cleanliness:clean/neat"],
                    labels=[1, 0, 0, -1, 0]),
        ]},
        {"image_id": "11051", "file": os.path.join(root, "000000011051.jpg"), "width": 40, "height": 40,
         "split": "train300", "regions": [
            _region("2311", [0.0, 0.0, 8.0, 8.0], category="person", labels=[0, 0, 0, 0, 0]),
        ]},
    ]
    assert list(read_ovad(ann, root)) == expected
    assert list(read_ovad(ann, root, split="val")) == expected[:1]
    attributes = ovad_attributes(ann)
    assert [a["name"] for a in attributes] == ["cleanliness:clean/neat", "color:white", "color:black",
                                               "material:wood/wooden", "pattern:has stripes/stripes"]
    assert attributes[4] == {"id": 4, "name": "pattern:has stripes/stripes", "type": "pattern",
                             "parent_type": "pattern", "is_has_att": "has"}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(att_vec=[1, 0, 0, 0]), r"annotation 2309: field 'att_vec' must be 5 int"),
    (lambda d: d["annotations"][1].update(att_vec=[1, 0, 2, 0, 0]), r"annotation 2310: field 'att_vec' must be"),
    (lambda d: d["annotations"][2].pop("att_vec"), r"annotation 2311: field 'att_vec' missing"),
    (lambda d: d["attributes"][3].update(id=7), r"attributes: field 'id' must number the attributes"),
    (lambda d: d["attributes"][1].pop("name"), r"attributes\[1\]: field 'name' missing"),
    (lambda d: d["images"][1].update(set=3), r"image 11051: field 'set' must be a string"),
])
def test_ovad_malformed(tmp_path, edit, message):
    root = _dataset(tmp_path, "ovad", {})
    ann = os.path.join(root, "ovad.json")
    _edit_json(ann, edit)
    with pytest.raises(ValueError, match=r"ovad\.json: " + message):
        list(read_ovad(ann, root))


# --- S3 -------------------------------------------------------------------------------------------------------------

@pytest.fixture
def s3_bucket(request):
    """A fresh bucket on the shared moto server (``s3_server`` comes from conftest)."""
    try:
        server = request.getfixturevalue("s3_server")
    except pytest.FixtureLookupError:
        pytest.skip("the s3_server fixture (tests/conftest.py) is not available")
    options = server["storage_options"]
    bucket = f"datasets-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"s3://{bucket}", options)
    fs.call_s3("create_bucket", Bucket=bucket)  # no LocationConstraint: valid whatever the region
    return f"s3://{bucket}", options


def _upload(local_root: str, uri: str, options) -> None:
    for folder, _, names in os.walk(local_root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), local_root).replace(os.sep, "/")
            with open(os.path.join(folder, name), "rb") as f:
                storage.write_bytes(storage.join(uri, rel), f.read(), options)


def test_readers_on_s3(tmp_path, s3_bucket):
    base, options = s3_bucket
    local_vg = _dataset(tmp_path, "vg", VG_IMAGES)
    _upload(local_vg, f"{base}/vg", options)
    assert list(read_visual_genome(f"{base}/vg", split="train", storage_options=options)) == \
        _vg_expected(f"{base}/vg", split=("train", "train", None))[:2]

    local_ref = _dataset(tmp_path, "refcocog", {"train2014/COCO_train2014_000000000009.jpg": (64, 48)})
    _upload(local_ref, f"{base}/refcocog", options)
    assert list(read_refcocog(f"{base}/refcocog", storage_options=options)) == \
        _refcocog_expected(f"{base}/refcocog/train2014")

    local_ovad = _dataset(tmp_path, "ovad", {})
    _upload(local_ovad, f"{base}/ovad", options)
    records = list(read_ovad(f"{base}/ovad/ovad.json", f"{base}/images", storage_options=options))
    assert records[0]["file"] == f"{base}/images/000000069356.jpg"
    assert len(ovad_attributes(f"{base}/ovad/ovad.json", options)) == 5
    records = list(read_coco_instances(f"{base}/ovad/ovad.json", f"{base}/images", storage_options=options))
    assert [len(r["regions"]) for r in records] == [2, 1]
