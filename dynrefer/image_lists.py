"""Image listings for captioning images alone: which images a Visual Genome root, a COCO images file, a list file
or a directory names, each with a stable image id that detections files can refer to."""

from __future__ import annotations

import posixpath
from collections import defaultdict
from typing import Any, Sequence

from dynrefer import datasets, storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_records(images: str, split: str | None = None, image_root: str | None = None,
                  storage_options: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """``{"image_id", "file", "split", "regions": []}`` per image of a Visual Genome root (``region_descriptions.json``,
    optionally one split), a COCO JSON's ``images`` (``id``, ``file_name`` under ``image_root``), a ``.txt`` list
    of image URIs or a directory of images (image id: the file name without its suffix)."""
    so = storage_options
    listed = images.endswith((".json", ".txt"))
    is_vg = not listed and storage.exists(storage.join(images, "region_descriptions.json"), so)
    if split is not None and not is_vg:
        raise ValueError(f"{images}: a split needs a Visual Genome root (with region_descriptions.json and splits/)")
    if is_vg:
        records = [{**{k: r[k] for k in ("image_id", "file", "split")}, "regions": [],
                    **({"error": r["error"]} if "error" in r else {})}
                   for r in datasets.read_visual_genome(images, split=split, storage_options=so, record_errors=True,
                                                        with_regions=False)]
    elif images.endswith(".json"):
        records = _coco_images(images, image_root or posixpath.dirname(images), so)
    else:
        if images.endswith(".txt"):
            files = [line.strip() for line in storage.read_bytes(images, so).decode().splitlines() if line.strip()]
        else:
            files = [storage.join(images, n) for n in sorted(storage.listdir(images, so))
                     if n.lower().endswith(IMAGE_SUFFIXES)]
        records = [{"image_id": image_id, "file": f, "split": None, "regions": []}
                   for image_id, f in zip(file_ids(files, images), files)]
    if not records:
        raise ValueError(f"{images}: no images" + (f" in split {split!r}" if split else ""))
    seen: dict[str, str] = {}
    for r in records:
        if r["image_id"] in seen:
            raise ValueError(f"{images}: image id {r['image_id']!r} names two files: {seen[r['image_id']]} and "
                             f"{r['file']}")
        seen[r["image_id"]] = r["file"]
    return records


def file_ids(files: Sequence[str], source: str = "images") -> list[str]:
    """Image ids for files named alone (a directory, a list): the name without its suffix, as detections files
    name them; files that share a stem (``x.jpg``, ``x.png``) are told apart by their whole name, and files that
    share a name (``a/x.jpg``, ``b/x.jpg``) by as many parent folders as it takes. The same files always get the
    same ids. A file listed twice is refused."""
    seen: dict[str, int] = {}
    for i, f in enumerate(files):
        if f in seen:
            raise ValueError(f"{source}: {f} is listed twice (lines {seen[f] + 1} and {i + 1})")
        seen[f] = i
    ids = [posixpath.splitext(posixpath.basename(f.rstrip("/")))[0] for f in files]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, image_id in enumerate(ids):
        groups[image_id].append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        parts = {i: [p for p in files[i].split("/") if p] for i in members}
        depth = 1
        while True:
            names = {i: "/".join(parts[i][-depth:]) for i in members}
            if len(set(names.values())) == len(members) or depth > max(len(p) for p in parts.values()):
                break
            depth += 1
        for i in members:
            ids[i] = names[i]
    taken: dict[str, str] = {}
    for image_id, f in zip(ids, files):
        if image_id in taken:  # "x.png" beside a stem "x.png" of "x.png.jpg": too odd to rename silently
            raise ValueError(f"{source}: image id {image_id!r} names two files: {taken[image_id]} and {f}; rename "
                             f"one")
        taken[image_id] = f
    return ids


def _coco_images(uri: str, root: str, so: storage.StorageOptions | None) -> list[dict[str, Any]]:
    """The ``images`` of a COCO JSON, streamed (an instances file's annotations are skipped, never parsed)."""
    try:
        entries = datasets.json_section(uri, datasets.top_level_kinds(uri, so), "images", so)
    except ValueError as e:
        raise ValueError(f"{uri}: expected a COCO JSON object with an 'images' list ({e})") from None
    records = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), (int, str))
                and isinstance(entry.get("file_name"), str) and entry["file_name"]):
            raise ValueError(f"{uri}: images[{i}]: needs an integer or string 'id' and a 'file_name'")
        records.append({"image_id": str(entry["id"]), "file": storage.join(root, entry["file_name"]), "split": None,
                        "regions": []})
    return records
