"""Readers of the real region datasets (Visual Genome, RefCOCOg, COCO, OVAD) into one record type.

Every reader takes a local directory or an ``s3://`` prefix (all I/O goes through :mod:`dynrefer.storage`)
and yields one :class:`ImageRecord` per image, in the order of the annotation file. Readers only parse:
they do not open images and do not drop regions with degenerate boxes (the prepare stage validates boxes
against the decoded image and records bad ones as errors), but every box must be four numbers.

Malformed annotations raise a ValueError naming the file, the entry and the field, e.g.
``.../region_descriptions.json: regions[3] of image 17: field 'width' missing``.

Record schema (boxes are ``[x1, y1, x2, y2]`` floats in pixels, x2/y2 exclusive, from the datasets' x, y, w, h)::

    ImageRecord  = {"image_id": str, "file": str, "width": int | None, "height": int | None,
                    "regions": [RegionRecord, ...], "split": str | None}
    RegionRecord = {"region_id": str, "box": [x1, y1, x2, y2], "caption": str | None, "captions": [str, ...],
                    "category": str | None, "attributes": [str, ...], "attribute_labels": [int, ...]}

``captions`` holds every reference sentence (RefCOCOg has several per region), ``[caption]`` when there is
one and ``[]`` when there is none. ``attribute_labels`` is OVAD's per-attribute vector (1 positive,
0 negative, -1 ignore, aligned with :func:`ovad_attributes`) and ``[]`` elsewhere.
"""

from __future__ import annotations

import builtins
import io
import pickle
import posixpath
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, TypedDict
from urllib.parse import unquote, urlparse

import numpy as np

from dynrefer import storage
from dynrefer.storage import StorageOptions


class RegionRecord(TypedDict):
    region_id: str
    box: list[float]
    caption: str | None
    captions: list[str]
    category: str | None
    attributes: list[str]
    attribute_labels: list[int]


class ImageRecord(TypedDict):
    image_id: str
    file: str
    width: int | None
    height: int | None
    regions: list[RegionRecord]
    split: str | None


class OvadAttribute(TypedDict):
    id: int
    name: str
    type: str | None
    parent_type: str | None
    is_has_att: str | None


def make_region(region_id: Any, box: list[float], caption: str | None = None, captions: list[str] | None = None,
                category: str | None = None, attributes: list[str] | None = None,
                attribute_labels: list[int] | None = None) -> RegionRecord:
    """A region record with the defaults filled in (``captions`` defaults to ``[caption]``)."""
    return {
        "region_id": str(region_id), "box": [float(v) for v in box], "caption": caption,
        "captions": list(captions) if captions is not None else ([caption] if caption is not None else []),
        "category": category, "attributes": list(attributes or []),
        "attribute_labels": list(attribute_labels or []),
    }


# --- field validation: every malformed input names its file, entry and field -------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "id": (lambda v: _is_int(v) or isinstance(v, str), "an integer or string id"),
}


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _error(file: str, where: str, message: str) -> ValueError:
    return ValueError(f"{file}: {where}: {message}" if where else f"{file}: {message}")


def _field(obj: Any, key: str | tuple[str, ...], kind: str, file: str, where: str, optional: bool = False) -> Any:
    """``obj[key]`` checked to be of ``kind``; a tuple of keys means the first present (format versions differ)."""
    if not isinstance(obj, dict):
        raise _error(file, where, f"expected an object, got {_describe(obj)}")
    keys = key if isinstance(key, tuple) else (key,)
    found = next((k for k in keys if k in obj), None)
    if found is None or (optional and obj[found] is None):
        if optional:
            return None
        raise _error(file, where, f"field '{keys[0]}' missing")
    value = obj[found]
    check, what = _KINDS[kind]
    if not check(value):
        raise _error(file, where, f"field '{found}' must be {what}, got {_describe(value)}")
    return value


def _list(value: Any, file: str, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _error(file, where, f"expected a list, got {_describe(value)}")
    return value


def _strings(obj: dict[str, Any], key: str, file: str, where: str) -> list[str]:
    """An optional list of strings, stripped, without empties or repeats."""
    values = _field(obj, key, "list", file, where, optional=True) or []
    out: dict[str, None] = {}
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _error(file, where, f"field '{key}'[{i}] must be a string, got {_describe(v)}")
        if v.strip():
            out.setdefault(v.strip(), None)
    return list(out)


def _xywh(obj: dict[str, Any], keys: tuple[str, str, str, str], file: str, where: str) -> list[float]:
    x, y, w, h = (float(_field(obj, k, "number", file, where)) for k in keys)
    return [x, y, x + w, y + h]


def _bbox(obj: dict[str, Any], file: str, where: str) -> list[float]:
    value = _field(obj, "bbox", "list", file, where)
    if len(value) != 4 or not all(_is_number(v) for v in value):
        raise _error(file, where, f"field 'bbox' must be 4 numbers [x, y, w, h], got {_describe(value)}")
    x, y, w, h = (float(v) for v in value)
    return [x, y, x + w, y + h]


def _size(obj: dict[str, Any], file: str, where: str) -> tuple[int | None, int | None]:
    width = _field(obj, "width", "int", file, where, optional=True)
    return width, _field(obj, "height", "int", file, where, optional=True)


def _image_dir(root: str, candidates: Iterable[str], storage_options: StorageOptions | None) -> str:
    """The first of ``root/<candidate>`` that exists, else ``root/<first candidate>``."""
    names = list(candidates)
    for name in names:
        uri = storage.join(root, name)
        if storage.exists(uri, storage_options):
            return uri
    return storage.join(root, names[0])


# --- streaming JSON: annotation files are read entry by entry, never whole -----------------------------------------

def iter_json_array(uri: str, storage_options: StorageOptions | None = None, prefix: str = "item",
                    where: str = "top level") -> Iterator[Any]:
    """The entries of the JSON array at ``prefix`` (``"item"``: the top level; ``"images.item"``: an object's
    ``images``), parsed one at a time with ijson, so that memory holds one entry and not the file.

    Numbers come as ``int`` or ``float`` (as :mod:`json` gives them). A top level that is not an array raises the
    ValueError the whole-file readers gave; malformed JSON a ValueError naming the file. ``prefix`` other than
    ``"item"`` yields nothing when the key is absent (callers check for it).
    """
    import ijson

    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        if prefix == "item":
            # The first byte says whether the top level is an array (peeked, so ijson's C reader still reads the
            # file itself: fed events from Python it is several times slower).
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            if not head.startswith(b"["):
                kind = {b"{": "dict {...}", b"": "nothing"}.get(head[:1], f"{head[:20]!r}")
                raise _error(uri, where, f"expected a list, got {kind}")
            f.seek(0)
        try:
            yield from ijson.items(f, prefix, use_float=True)
        except ijson.JSONError as e:
            raise ValueError(f"{uri}: invalid JSON: {e}") from None


def top_level_kinds(uri: str, storage_options: StorageOptions | None) -> dict[str, str]:
    """key -> the ijson event that starts its value (``start_array``, ``start_map``, ``string``...) for the
    top-level object of a JSON file, tokenised in one pass without building the values."""
    import ijson

    kinds: dict[str, str] = {}
    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        events = ijson.parse(f)
        try:
            first = next(events, None)
            if first is None or first[1] != "start_map":
                raise _error(uri, "top level", "expected an object, got "
                             + {"start_array": "list [...]", None: "nothing"}.get(first and first[1], "a scalar"))
            key = None
            for prefix, event, value in events:
                if prefix == "" and event == "map_key":
                    key = value
                elif key is not None and prefix == key and key not in kinds:
                    kinds[key] = event
        except ijson.JSONError as e:
            raise ValueError(f"{uri}: invalid JSON: {e}") from None
    return kinds


def json_section(uri: str, kinds: dict[str, str], key: str, storage_options: StorageOptions | None
                 ) -> Iterator[Any]:
    """The entries of the top-level list ``key`` of a COCO-format file, streamed; a missing or non-list value
    raises as :func:`_field` would."""
    if key not in kinds:
        raise _error(uri, "top level", f"field '{key}' missing")
    if kinds[key] != "start_array":
        raise _error(uri, "top level", f"field '{key}' must be a list, got {kinds[key]}")
    return iter_json_array(uri, storage_options, prefix=f"{key}.item")


class _Lookahead:
    """Entries of a second per-image array, looked up while the first is streamed.

    Visual Genome's files (and the synthetic corpus's) list images in the same order, so each lookup reads the
    next entry and the buffer of entries read ahead stays empty; any other order still gives the right answer,
    with the buffer growing to the entries skipped over.
    """

    def __init__(self, entries: Iterator[tuple[str, Any]]):
        self.entries, self.ahead = entries, {}

    def pop(self, key: str, default: Any = None) -> Any:
        if key in self.ahead:
            return self.ahead.pop(key)
        for k, value in self.entries:
            if k == key:
                return value
            self.ahead[k] = value
        return default


# --- splits -------------------------------------------------------------------------------------------------------

def _split_ids(uri: str, split: str | None, storage_options: StorageOptions | None) -> dict[str, str | None]:
    """image id -> split name from a split file: a list of ids (the file is one split) or {split: [ids]}."""
    data = storage.read_json(uri, storage_options)
    if isinstance(data, list):
        groups = {split: data}
    elif isinstance(data, dict):
        groups = {str(k): v for k, v in data.items() if split is None or k == split}
        if split is not None and split not in groups:
            raise _error(uri, "", f"field '{split}' missing (splits in the file: {sorted(data)})")
    else:
        raise _error(uri, "", f"expected a list of image ids or an object of them per split, got {_describe(data)}")
    out: dict[str, str | None] = {}
    for name, ids in groups.items():
        for i, image_id in enumerate(_list(ids, uri, f"split {name!r}")):
            if not (_is_int(image_id) or isinstance(image_id, str)):
                raise _error(uri, f"split {name!r}[{i}]", f"image id must be an integer or string, "
                                                          f"got {_describe(image_id)}")
            out[str(image_id)] = name
    return out


def _all_split_labels(root: str, storage_options: StorageOptions | None) -> dict[str, str | None]:
    """image id -> split from every ``root/splits/{split}.json``, to label records when no split is asked for."""
    labels: dict[str, str | None] = {}
    for name in storage.listdir(storage.join(root, "splits"), storage_options):
        if name.endswith(".json"):
            labels.update(_split_ids(storage.join(root, "splits", name), name[:-5], storage_options))
    return labels


# --- Visual Genome ------------------------------------------------------------------------------------------------

#: Where VG images may lie under the dataset root, searched in this order.
VG_IMAGE_DIRS = ("images", "images/VG_100K", "images/VG_100K_2", "VG_100K", "VG_100K_2")

#: Suffixes of the files an image id may name when image_data.json names none (``.jpg`` preferred).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _url_parts(url: str | None) -> list[str]:
    """The path components of an image_data ``url`` (``https://.../VG_100K_2/1.jpg`` or ``images/1.png``)."""
    if not url:
        return []
    parts = [unquote(p) for p in urlparse(url).path.split("/")]
    return [p for p in parts if p and p != "."]


class _VGImageFiles:
    """Finds each image's file from one listing per folder (no per-image requests, which S3 would make slow).

    The folders are :data:`VG_IMAGE_DIRS` plus the folders that relative ``url`` paths of image_data.json name
    (never above the root). An image's file is the one its url names (the longest tail of the url's path that
    is a listed file: ``VG_100K_2/1.jpg``, then the base name ``1.jpg``), else a listed ``{image_id}`` file with
    any image suffix, else ``images/{image_id}.jpg`` (which then fails, at decoding, as missing).
    """

    def __init__(self, root: str, urls: Iterable[str | None], storage_options: StorageOptions | None):
        self.root = root
        folders = dict.fromkeys(VG_IMAGE_DIRS)
        for url in urls:
            if url and not urlparse(url).scheme:
                parts = _url_parts(url)[:-1]
                if parts and ".." not in parts and not url.startswith("/"):
                    folders.setdefault("/".join(parts))
        self.by_path: dict[str, str] = {}  # "images/VG_100K/1.jpg" -> URI
        self.by_name: dict[str, str] = {}  # "1.jpg" -> URI, the first folder's
        self.by_stem: dict[str, list[str]] = defaultdict(list)  # "1" -> ["1.jpg", "1.png"]
        for folder in folders:
            base = storage.join(root, folder)
            for name in storage.listdir(base, storage_options):
                uri = storage.join(base, name)
                self.by_path[f"{folder}/{name}"] = uri
                if name not in self.by_name:
                    self.by_name[name] = uri
                    stem, suffix = posixpath.splitext(name)
                    if suffix.lower() in IMAGE_SUFFIXES:
                        self.by_stem[stem].append(name)

    def find(self, image_id: str, url: str | None) -> str:
        parts = _url_parts(url)
        for k in range(len(parts), 1, -1):
            uri = self.by_path.get("/".join(parts[-k:]))
            if uri is not None:
                return uri
        if parts and parts[-1] in self.by_name:
            return self.by_name[parts[-1]]
        names = self.by_stem.get(image_id)
        if names:
            best = min(names, key=lambda n: (posixpath.splitext(n)[1].lower() != ".jpg", n))
            return self.by_name[best]
        return storage.join(self.root, "images", f"{image_id}.jpg")


def _vg_objects(root: str, storage_options: StorageOptions | None
                ) -> Iterator[tuple[str, list[tuple[list[float], str | None, list[str]]]]]:
    """(image id, [(box, name, attributes)]) per entry of attributes.json (or objects.json), streamed; nothing
    when neither exists."""
    for name, key in (("attributes.json", "attributes"), ("objects.json", "objects")):
        uri = storage.join(root, name)
        if storage.exists(uri, storage_options):
            break
    else:
        return
    for i, entry in enumerate(iter_json_array(uri, storage_options)):
        image_id = str(_field(entry, ("image_id", "id"), "id", uri, f"entry {i}"))
        objects = []
        for j, obj in enumerate(_field(entry, key, "list", uri, f"image {image_id}", optional=True) or []):
            where = f"{key}[{j}] of image {image_id}"
            box = _xywh(obj, ("x", "y", "w", "h"), uri, where)
            names = _strings(obj, "names", uri, where) if "names" in obj else \
                [n for n in [_field(obj, "name", "str", uri, where, optional=True)] if n]
            objects.append((box, names[0] if names else None, _strings(obj, "attributes", uri, where)))
        yield image_id, objects


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _match_objects(regions: list[RegionRecord], objects: list[tuple[list[float], str | None, list[str]]],
                   min_iou: float) -> None:
    """Give each region the category and attributes of its best-overlapping object (IoU >= min_iou)."""
    if not regions or not objects:
        return
    r = np.array([reg["box"] for reg in regions])  # (R, 4)
    o = np.array([box for box, _, _ in objects])  # (O, 4)
    w = np.clip(np.minimum(r[:, None, 2], o[None, :, 2]) - np.maximum(r[:, None, 0], o[None, :, 0]), 0, None)
    h = np.clip(np.minimum(r[:, None, 3], o[None, :, 3]) - np.maximum(r[:, None, 1], o[None, :, 1]), 0, None)
    inter = w * h  # (R, O)
    union = _area(r)[:, None] + _area(o)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    best = iou.argmax(axis=1)
    for i, region in enumerate(regions):
        if iou[i, best[i]] >= min_iou:
            _, category, attributes = objects[best[i]]
            region["category"], region["attributes"] = category, list(attributes)


def read_visual_genome(root: str, split: str | None = None, storage_options: StorageOptions | None = None,
                       split_file: str | None = None, use_objects: bool = True,
                       min_object_iou: float = 0.5, record_errors: bool = False,
                       with_regions: bool = True) -> Iterator[ImageRecord]:
    """Visual Genome v1.2 region descriptions, one record per image of ``region_descriptions.json``.

    ``image_data.json`` gives sizes. Splits come from ``split_file`` (a list of image ids, or
    ``{"train": [...], "val": [...], "test": [...]}`` as in DenseCap's ``densecap_splits.json``) or, when only
    ``split`` is given, from ``root/splits/{split}.json``. With ``attributes.json`` (or ``objects.json``) present
    and ``use_objects``, each region takes the name and attributes of the object that best overlaps it
    (VG links regions to objects only through region graphs, which we do not read). An image's file is the one
    its image_data ``url`` names, in any format, else ``{id}`` with any image suffix, looked up in
    :data:`VG_IMAGE_DIRS` (see :class:`_VGImageFiles`); a missing one gets ``root/images/{id}.jpg`` and fails
    later, at decoding.
    With ``record_errors``, a malformed entry or region is yielded with an ``"error"`` message instead of raising,
    so that a batch job can count it as an error row and go on. ``with_regions=False`` lists the images alone
    (``regions`` empty, their entries not parsed, objects not read): what dense captioning needs.

    Every file is streamed (:func:`iter_json_array`): memory holds one image's entries, not the corpus.
    """
    if split is not None and split_file is None:
        split_file = storage.join(root, "splits", f"{split}.json")
    splits = _split_ids(split_file, split, storage_options) if split_file else None
    labels = splits if splits is not None else _all_split_labels(root, storage_options)

    image_uri = storage.join(root, "image_data.json")
    sizes: dict[str, tuple[int | None, int | None]] = {}
    urls: dict[str, str | None] = {}
    for i, entry in enumerate(iter_json_array(image_uri, storage_options)):
        image_id = str(_field(entry, ("image_id", "id"), "id", image_uri, f"entry {i}"))
        sizes[image_id] = _size(entry, image_uri, f"image {image_id}")
        urls[image_id] = _field(entry, "url", "str", image_uri, f"image {image_id}", optional=True)

    region_uri = storage.join(root, "region_descriptions.json")
    entries = iter_json_array(region_uri, storage_options)
    objects = _Lookahead(_vg_objects(root, storage_options) if use_objects and with_regions else iter(()))
    files = _VGImageFiles(root, urls.values(), storage_options)
    for i, entry in enumerate(entries):
        try:
            image_id = str(_field(entry, ("id", "image_id"), "id", region_uri, f"entry {i}"))
            raw_regions = _field(entry, "regions", "list", region_uri, f"image {image_id}")
        except ValueError as e:
            if not record_errors:
                raise
            yield {"image_id": f"entry-{i}", "file": "", "width": None, "height": None, "regions": [],
                   "split": None, "error": str(e)}
            continue
        image_objects = objects.pop(image_id, [])
        if splits is not None and image_id not in splits:
            continue
        regions = []
        for j, region in enumerate(raw_regions if with_regions else []):
            where = f"regions[{j}] of image {image_id}"
            try:
                region_id = _field(region, ("region_id", "id"), "id", region_uri, where)
                box = _xywh(region, ("x", "y", "width", "height"), region_uri, where)
                phrase = _field(region, "phrase", "str", region_uri, where).strip()
            except ValueError as e:
                if not record_errors:
                    raise
                rid = region.get("region_id", region.get("id")) if isinstance(region, dict) else None
                regions.append({**make_region(rid if rid is not None else f"{image_id}-{j}", [0, 0, 0, 0]),
                                "error": str(e)})
                continue
            regions.append(make_region(region_id, box, phrase))
        _match_objects([r for r in regions if "error" not in r], image_objects, min_object_iou)
        width, height = sizes.get(image_id, (None, None))
        file = files.find(image_id, urls.get(image_id))
        yield {"image_id": image_id, "file": file, "width": width, "height": height, "regions": regions,
               "split": labels.get(image_id)}


# --- RefCOCOg -----------------------------------------------------------------------------------------------------

_PICKLE_BUILTINS = frozenset({"dict", "list", "str", "int", "float", "tuple"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain containers and scalars; any other global (a class, ``os.system``) is refused unloaded."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _PICKLE_BUILTINS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _text(value: Any) -> Any:
    """Python 2 byte strings to str (UTF-8, else Latin-1), through containers."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_text(v) for v in value)
    return value


def restricted_unpickle(data: bytes, name: str = "pickle") -> Any:
    """Unpickle untrusted data that may only hold dicts, lists, tuples, strings and numbers.

    Anything else raises a ValueError naming ``name`` before any of it is built or called. Python 2 pickles
    (``refs(umd).p`` is protocol 2 from Python 2) are read with ``encoding="bytes"`` so ``str`` arrives as
    raw bytes and is decoded here as UTF-8, falling back to Latin-1: plain ``encoding="latin1"`` would turn
    UTF-8 text into mojibake.
    """
    try:
        return _text(_RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load())
    except Exception as e:  # any failure to parse untrusted bytes is bad input, whatever the opcode hit
        raise ValueError(f"{name}: refused or unreadable pickle ({type(e).__name__}: {e})") from None


def _category(categories: dict[str, str], category_id: Any, uri: str, where: str) -> str:
    if str(category_id) not in categories:
        raise _error(uri, where, f"field 'category_id' = {category_id!r} is not in 'categories'")
    return categories[str(category_id)]


def read_refcocog(root: str, split: str | None = None, storage_options: StorageOptions | None = None,
                  image_root: str | None = None, refs_file: str = "refs(umd).p",
                  instances_file: str = "instances.json") -> Iterator[ImageRecord]:
    """RefCOCOg (umd split): ``refs(umd).p`` + COCO-format ``instances.json``, one record per image and split.

    Each ref is one region: its box is its annotation's, ``captions`` are all its sentences (the normalised
    ``sent``, else ``raw``) and ``caption`` is the first. Images lie in ``image_root``, by default
    ``root/images`` or else ``root/train2014``.
    """
    refs_uri = storage.join(root, refs_file)
    refs = _list(restricted_unpickle(storage.read_bytes(refs_uri, storage_options), refs_uri), refs_uri, "top level")
    inst_uri = storage.join(root, instances_file)
    kinds = top_level_kinds(inst_uri, storage_options)  # streamed: COCO's segmentations are never built
    for key in ("images", "categories"):
        json_section(inst_uri, kinds, key, storage_options)
    categories = _coco_categories(inst_uri, kinds, storage_options)
    image_info: dict[str, tuple[str, int | None, int | None]] = {}
    for i, img in enumerate(json_section(inst_uri, kinds, "images", storage_options)):
        image_id = str(_field(img, "id", "id", inst_uri, f"images[{i}]"))
        where = f"image {image_id}"
        image_info[image_id] = (_field(img, "file_name", "str", inst_uri, where), *_size(img, inst_uri, where))
    boxes: dict[str, tuple[list[float], Any]] = {}
    for i, ann in enumerate(json_section(inst_uri, kinds, "annotations", storage_options)):
        ann_id = str(_field(ann, "id", "id", inst_uri, f"annotations[{i}]"))
        where = f"annotation {ann_id}"
        boxes[ann_id] = (_bbox(ann, inst_uri, where), _field(ann, "category_id", "id", inst_uri, where))
    folder = image_root or _image_dir(root, ("images", "train2014"), storage_options)

    groups: dict[tuple[str, str | None], list[RegionRecord]] = defaultdict(list)
    for i, ref in enumerate(refs):
        ref_id = _field(ref, "ref_id", "id", refs_uri, f"refs[{i}]")
        where = f"ref {ref_id}"
        ref_split = _field(ref, "split", "str", refs_uri, where, optional=True)
        if split is not None and ref_split != split:
            continue
        image_id = str(_field(ref, "image_id", "id", refs_uri, where))
        ann_id = str(_field(ref, "ann_id", "id", refs_uri, where))
        if ann_id not in boxes:
            raise _error(refs_uri, where, f"field 'ann_id' = {ann_id} is not an annotation of {inst_uri}")
        if image_id not in image_info:
            raise _error(refs_uri, where, f"field 'image_id' = {image_id} is not an image of {inst_uri}")
        box, ann_category = boxes[ann_id]
        category_id = _field(ref, "category_id", "id", refs_uri, where, optional=True)
        category = _category(categories, ann_category, inst_uri, f"annotation {ann_id}") if category_id is None \
            else _category(categories, category_id, refs_uri, where)
        sentences = []
        for j, sent in enumerate(_field(ref, "sentences", "list", refs_uri, where)):
            sw = f"sentences[{j}] of ref {ref_id}"
            text = _field(sent, ("sent", "raw"), "str", refs_uri, sw).strip()
            if text:
                sentences.append(text)
        if not sentences:
            raise _error(refs_uri, where, "field 'sentences' has no non-empty sentence")
        groups[(image_id, ref_split)].append(make_region(ref_id, box, sentences[0], sentences, category))
    for (image_id, ref_split), regions in groups.items():
        file_name, width, height = image_info[image_id]
        yield {"image_id": image_id, "file": storage.join(folder, file_name), "width": width, "height": height,
               "regions": regions, "split": ref_split}


# --- COCO and OVAD ------------------------------------------------------------------------------------------------

_RegionBuilder = Callable[[dict[str, Any], str, list[float], str], "RegionRecord | None"]
_SplitOf = Callable[[dict[str, Any], str], "tuple[bool, str | None]"]


def _coco_categories(uri: str, kinds: dict[str, str], storage_options: StorageOptions | None) -> dict[str, str]:
    categories: dict[str, str] = {}
    for i, cat in enumerate(json_section(uri, kinds, "categories", storage_options)):
        categories[str(_field(cat, "id", "id", uri, f"categories[{i}]"))] = \
            _field(cat, "name", "str", uri, f"categories[{i}]")
    return categories


def _coco_like(uri: str, storage_options: StorageOptions | None, image_root: str, region: _RegionBuilder,
               split_of: _SplitOf, kinds: dict[str, str] | None = None) -> Iterator[ImageRecord]:
    """Shared walk over a COCO-format file, one record per image (images without boxes included).

    The file is streamed section by section (``categories``, ``images``, ``annotations``), so memory holds the
    regions built, not the parsed file (whose segmentation polygons are most of COCO's size). ``region`` builds
    a region from an annotation (None skips it); ``split_of`` says whether to keep an image and its split label.
    """
    kinds = kinds if kinds is not None else top_level_kinds(uri, storage_options)
    for key in ("images", "categories"):
        json_section(uri, kinds, key, storage_options)  # a missing section fails before any work
    categories = _coco_categories(uri, kinds, storage_options)
    kept: list[tuple[str, str, int | None, int | None, str | None]] = []
    known: set[str] = set()
    for i, img in enumerate(json_section(uri, kinds, "images", storage_options)):
        image_id = str(_field(img, "id", "id", uri, f"images[{i}]"))
        where = f"image {image_id}"
        known.add(image_id)
        file_name = _field(img, "file_name", "str", uri, where)
        keep, label = split_of(img, where)
        if keep:
            kept.append((image_id, file_name, *_size(img, uri, where), label))
    by_image: dict[str, list[RegionRecord]] = defaultdict(list)
    for i, ann in enumerate(json_section(uri, kinds, "annotations", storage_options)):
        ann_id = _field(ann, "id", "id", uri, f"annotations[{i}]")
        where = f"annotation {ann_id}"
        image_id = str(_field(ann, "image_id", "id", uri, where))
        if image_id not in known:
            raise _error(uri, where, f"field 'image_id' = {image_id} is not in 'images'")
        category = _category(categories, _field(ann, "category_id", "id", uri, where), uri, where)
        built = region(ann, where, _bbox(ann, uri, where), category)
        if built is not None:
            by_image[image_id].append(built)
    for image_id, file_name, width, height, label in kept:
        yield {"image_id": image_id, "file": storage.join(image_root, file_name), "width": width,
               "height": height, "regions": by_image.pop(image_id, []), "split": label}


def read_coco_instances(instances_json: str, image_root: str, split: str | None = None,
                        storage_options: StorageOptions | None = None,
                        include_crowd: bool = False) -> Iterator[ImageRecord]:
    """COCO instances for region recognition: each box with its category name and no caption.

    A COCO instances file is one split, so ``split`` only labels the records. Crowd boxes (``iscrowd=1``)
    cover several objects and are skipped unless ``include_crowd``.
    """
    def region(ann: dict[str, Any], where: str, box: list[float], category: str) -> RegionRecord | None:
        crowd = _field(ann, "iscrowd", "int", instances_json, where, optional=True)
        if crowd and not include_crowd:
            return None
        return make_region(ann["id"], box, category=category)

    return _coco_like(instances_json, storage_options, image_root, region, lambda img, where: (True, split))


def ovad_attributes(ovad_json: str, storage_options: StorageOptions | None = None) -> list[OvadAttribute]:
    """OVAD's attribute vocabulary, ordered by id; ``attribute_labels`` of OVAD regions align with it."""
    return _ovad_attributes(ovad_json, top_level_kinds(ovad_json, storage_options), storage_options)


def _ovad_attributes(uri: str, kinds: dict[str, str], storage_options: StorageOptions | None
                     ) -> list[OvadAttribute]:
    out: list[OvadAttribute] = []
    for i, att in enumerate(json_section(uri, kinds, "attributes", storage_options)):
        where = f"attributes[{i}]"
        out.append({
            "id": _field(att, "id", "int", uri, where), "name": _field(att, "name", "str", uri, where),
            "type": _field(att, "type", "str", uri, where, optional=True),
            "parent_type": _field(att, "parent_type", "str", uri, where, optional=True),
            "is_has_att": _field(att, "is_has_att", "str", uri, where, optional=True),
        })
    out.sort(key=lambda a: a["id"])
    if [a["id"] for a in out] != list(range(len(out))):
        raise _error(uri, "attributes", "field 'id' must number the attributes 0..N-1 (att_vec is indexed by it)")
    return out


def read_ovad(ovad_json: str, image_root: str, split: str | None = None,
              storage_options: StorageOptions | None = None) -> Iterator[ImageRecord]:
    """OVAD (open-vocabulary attribute detection): COCO-format boxes whose ``att_vec`` labels every attribute.

    ``attributes`` are the names of the positive (1) attributes, as OVAD spells them
    ("cleanliness:clean/neat"); ``attribute_labels`` keep the whole vector (1 positive, 0 negative,
    -1 ignore) for evaluation. Images carry an optional ``set`` ("train300"...), used as the split label;
    ``split`` keeps only the images of that set.
    """
    kinds = top_level_kinds(ovad_json, storage_options)
    names = [a["name"] for a in _ovad_attributes(ovad_json, kinds, storage_options)]

    def region(ann: dict[str, Any], where: str, box: list[float], category: str) -> RegionRecord:
        vec = _field(ann, "att_vec", "list", ovad_json, where)
        if len(vec) != len(names) or not all(_is_int(v) and v in (-1, 0, 1) for v in vec):
            raise _error(ovad_json, where, f"field 'att_vec' must be {len(names)} integers in {{1, 0, -1}}, "
                                           f"got {_describe(vec)}")
        positives = [n for n, v in zip(names, vec) if v == 1]
        return make_region(ann["id"], box, category=category, attributes=positives, attribute_labels=vec)

    def split_of(img: dict[str, Any], where: str) -> tuple[bool, str | None]:
        image_set = _field(img, "set", "str", ovad_json, where, optional=True)
        return split is None or image_set == split, image_set

    return _coco_like(ovad_json, storage_options, image_root, region, split_of, kinds)
