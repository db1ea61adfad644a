"""A Visual-Genome-layout corpus whose images are PNGs of the modes real datasets hold (16-bit grayscale, palette,
RGBA, ...), named the ways image_data.json names them: by a full VG url, by a relative path whose file name is not
the image id, by no url at all, and by a url whose ``.jpg`` lies (the file is a ``.png``). Shared by the dataset,
prepare and caption tests."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """Noise with two shapes, so that views and pHASH codes differ."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 80, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([4, 4, width // 2, height // 2], fill=(230, 40, 40))
    draw.ellipse([width // 2, height // 3, width - 3, height - 3], fill=(40, 90, 230))
    return np.asarray(img)


def _sixteen_bit(width: int, height: int, seed: int) -> Image.Image:
    gray = _picture(width, height, seed).mean(axis=2)
    return Image.fromarray((gray * 257).astype(np.uint16))  # mode I;16, the full 16-bit range


def _palette(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(_picture(width, height, seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)


def _rgba(width: int, height: int, seed: int) -> Image.Image:
    rgb = _picture(width, height, seed)
    alpha = np.full((height, width, 1), 255, dtype=np.uint8)
    alpha[: height // 4] = 0  # a transparent band: colour under it is kept
    return Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA")


def _gray_alpha(width: int, height: int, seed: int) -> Image.Image:
    return _rgba(width, height, seed).convert("LA")


#: image id -> (file under the root, image_data url or None, size, image maker, PIL mode written)
IMAGES: dict[str, tuple[str, str | None, tuple[int, int], Any, str]] = {
    "1": ("images/VG_100K/1.png", "https://cs.stanford.edu/people/rak248/VG_100K/1.png", (64, 48), _sixteen_bit,
          "I;16"),
    "2": ("images/pal-2.png", "images/pal-2.png", (40, 30), _palette, "P"),
    "3": ("VG_100K_2/3.png", "https://cs.stanford.edu/people/rak248/VG_100K_2/3.png", (50, 40), _rgba, "RGBA"),
    "4": ("images/4.png", None, (36, 36), _gray_alpha, "LA"),
    "5": ("images/5.png", "https://cs.stanford.edu/people/rak248/VG_100K/5.jpg", (44, 33), _sixteen_bit, "I;16"),
}
#: An image that image_data.json lists but no file holds.
MISSING = "6"


def write_png_corpus(root: str) -> dict[str, Any]:
    """Write the corpus under ``root``; returns {"files": {image id: path}, "regions": {image id: count}}."""
    image_data, regions, files = [], [], {}
    for n, (image_id, (rel, url, (w, h), make, mode)) in enumerate(IMAGES.items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img = make(w, h, seed=n)
        assert img.mode == mode, (img.mode, mode)
        img.save(path, format="PNG")
        with Image.open(path) as check:  # what the file holds, read back
            assert check.mode == mode and check.format == "PNG", (path, check.mode)
        files[image_id] = path
        image_data.append({"image_id": int(image_id), "url": url, "width": w, "height": h, "coco_id": None,
                           "flickr_id": None})
        regions.append({"id": int(image_id), "regions": [
            {"region_id": int(image_id) * 10 + 1, "image_id": int(image_id), "x": 2, "y": 3, "width": w // 2,
             "height": h // 2, "phrase": "a red square"},
            {"region_id": int(image_id) * 10 + 2, "image_id": int(image_id), "x": w // 2, "y": h // 3,
             "width": w // 2 - 3, "height": h // 2, "phrase": "a blue circle"}]})
    image_data.append({"image_id": int(MISSING), "url": "https://cs.stanford.edu/people/rak248/VG_100K/6.jpg",
                       "width": 30, "height": 30, "coco_id": None, "flickr_id": None})
    regions.append({"id": int(MISSING), "regions": [{"region_id": 61, "image_id": 6, "x": 1, "y": 1, "width": 10,
                                                     "height": 10, "phrase": "nothing to see"}]})
    os.makedirs(os.path.join(root, "splits"), exist_ok=True)
    for name, data in (("image_data.json", image_data), ("region_descriptions.json", regions),
                       ("splits/test.json", [int(i) for i in [*IMAGES, MISSING]])):
        with open(os.path.join(root, name), "w") as f:
            json.dump(data, f)
    return {"files": files, "regions": {str(r["id"]): len(r["regions"]) for r in regions}}
