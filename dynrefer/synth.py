"""The built-in synthetic region corpus, written in the Visual Genome v1.2 layout.

No real corpus can be downloaded, so the default data is generated. It is built so that DynRefer's claims
can be tested on it, and so that every word a caption states can be seen in some view: each object's surface
pattern has a period that scales with the object (about 6-8 periods across it, never under 4 px), so the region's
own view (t=0) shows it at any encoder size from 64 px up, while the whole image shrunk to 64 px blurs away the
patterns of tiny and small objects (medium and large ones keep some: their t=1 view is not far from t=0). Every
caption may name a spatial relation to a neighbour, and a size relative to the image, which need context (larger
t). The pattern is mean-preserving, so a shrunk image shows each object's colour but nothing of its pattern.

Everything is deterministic: image ``i`` of seed ``s`` draws from its own random streams seeded by ``(s, i)``,
so any image can be regenerated alone, generation runs in parallel, and an interrupted run resumes.

Layout of ``write_corpus(out, ...)`` (boxes are x, y, width, height in integer pixels)::

    images/{image_id}.jpg
    image_data.json          [{image_id, url, width, height, coco_id: null, flickr_id: null}]
    region_descriptions.json [{id: image_id, regions: [{region_id, image_id, phrase, x, y, width, height}]}]
    objects.json             [{image_id, objects: [{object_id, x, y, w, h, names: [shape], synsets: []}]}]
    attributes.json          [{image_id, attributes: [{object_id, x, y, w, h, names, synsets, attributes}]}]
    splits/{train,val,test}.json   lists of image ids (about 80/10/10, each non-empty from 3 images on)
    synth_meta.json          seed, num_images, generator version, vocabularies, counts

Image ids run from 1 to ``num_images``; an object's id (and its region's) is ``image_id * 100 + k``, k = 1..15.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from dynrefer import storage
from dynrefer.storage import StorageOptions

#: Bumped whenever the same seed would give different bytes; a resumed run refuses to mix versions.
GENERATOR_VERSION = "2"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart",
                           "ring", "pentagon", "arrow", "crescent")

#: Colour names and their RGB values; channels keep some headroom so every pattern can modulate around them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45), "orange": (235, 135, 35), "yellow": (230, 210, 50), "green": (55, 165, 70),
    "cyan": (50, 195, 205), "blue": (45, 85, 210), "purple": (135, 65, 185), "pink": (240, 130, 180),
    "brown": (135, 90, 50), "white": (215, 215, 215), "black": (42, 42, 42),
}

PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "zigzag", "speckled")
#: The noun each pattern takes in "a red star with stripes"; solid has none.
PATTERN_NOUNS: dict[str, str] = {"striped": "stripes", "dotted": "dots", "checkered": "checks",
                                 "zigzag": "zigzags", "speckled": "speckles"}

SIZES: tuple[str, ...] = ("tiny", "small", "medium", "large")
#: Upper bounds of sqrt(box area / image area) for tiny, small and medium; anything above is large.
SIZE_BOUNDS: tuple[float, float, float] = (0.075, 0.15, 0.29)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "next to", "near")
#: The phrasings each relation takes in captions.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next to": ("next to", "beside"),
    "near": ("near", "close to"),
}

_MIN_SIDE, _MAX_SIDE = 320, 1024  # image width and height, drawn independently
_MIN_OBJECTS, _MAX_OBJECTS = 3, 15
_MIN_OBJECT_PX = 14  # an object's smallest box side before rotation: room for about three pattern periods
#: Pattern periods across an object (its period is sqrt(box area) / n): in the region's own view at 64 px a period
#: is 8-11 px, while in the whole image shrunk to 64 px it falls under the 2 px Nyquist limit for all but large
#: objects.
_PERIODS_ACROSS = (6, 7, 8)
_MIN_PERIOD_PX = 4  # the finest period drawn: tiny objects get fewer periods, each still 4 px or more
_PATTERN_AMPLITUDE = 90.0  # largest per-channel swing of a pattern around the object's colour
#: Ranges of sqrt(box area / image area) an object is drawn with, per target size, and how often each is drawn.
_SIZE_RANGES = ((0.03, 0.065), (0.085, 0.14), (0.165, 0.27), (0.31, 0.42))
_SIZE_WEIGHTS = (0.35, 0.3, 0.22, 0.13)
_MAX_COVERED = 0.12  # the most of an object's pixels another object may cover
_MAX_BOX_OVERLAP = 0.1  # the most of a box another box may overlap: few objects sit inside others' boxes
_CAPTION_WORDS = ("a", "the", "with", "covered", "in", "that", "is")
_SPLITS = ("train", "val", "test")
_CHUNK = 8  # images per task of the writing threads


# --- shapes ---------------------------------------------------------------------------------------------------

def _regular(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    a = start + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _star() -> np.ndarray:
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    a = -math.pi / 2 + math.pi * np.arange(10) / 5
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _normalised(outer: np.ndarray, holes: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scale so that the outer outline spans [-1, 1] on both axes; holes move with it."""
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    return (outer - centre) / half, [(h - centre) / half for h in holes]


_CROSS = np.array([(-0.32, -1), (0.32, -1), (0.32, -0.32), (1, -0.32), (1, 0.32), (0.32, 0.32), (0.32, 1),
                   (-0.32, 1), (-0.32, 0.32), (-1, 0.32), (-1, -0.32), (-0.32, -0.32)], dtype=np.float64)
_ARROW = np.array([(-1, -0.3), (0.15, -0.3), (0.15, -0.8), (1, 0), (0.15, 0.8), (0.15, 0.3), (-1, 0.3)],
                  dtype=np.float64)
#: Each shape as an outline with holes, in [-1, 1]^2 (y down).
_OUTLINES: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {
    name: _normalised(*spec) for name, spec in {
        "circle": (_regular(48), []),
        "square": (_regular(4, start=-math.pi / 4), []),
        "triangle": (np.array([(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]), []),
        "star": (_star(), []),
        "hexagon": (_regular(6, start=0.0), []),
        "diamond": (_regular(4), []),
        "cross": (_CROSS, []),
        "heart": (_heart(), []),
        "ring": (_regular(48), [_regular(48, radius=0.55)]),
        "pentagon": (_regular(5), []),
        "arrow": (_ARROW, []),
        "crescent": (_regular(48), [_regular(48, radius=0.85) + np.array([0.45, -0.15])]),
    }.items()
}
#: Width / height of each shape's box before jitter.
_ASPECT = {"diamond": 0.72, "arrow": 1.3}


def _rasterise(shape: str, width: float, height: float, angle: float) -> np.ndarray:
    """The shape's pixels, scaled to width x height, rotated by ``angle`` radians, trimmed.  # (h, w) bool"""
    outer, holes = _OUTLINES[shape]
    c, s = math.cos(angle), math.sin(angle)
    transform = np.array([[c, s], [-s, c]]) * np.array([[width / 2], [height / 2]]).T  # scale, then rotate
    polygons = [p @ transform for p in (outer, *holes)]
    lo = polygons[0].min(axis=0)
    size = np.ceil(polygons[0].max(axis=0) - lo).astype(int) + 1
    canvas = Image.new("L", (int(size[0]), int(size[1])), 0)
    draw = ImageDraw.Draw(canvas)
    for i, p in enumerate(polygons):
        draw.polygon([(float(x), float(y)) for x, y in p - lo], fill=0 if i else 1)
    mask = np.asarray(canvas, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


# --- patterns -------------------------------------------------------------------------------------------------

def _pattern_signal(pattern: str, height: int, width: int, period: int, variant: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Where the pattern's second tone lies, in the object's own frame.  # (height, width) bool"""
    y, x = np.ogrid[:height, :width]
    half = period // 2
    if pattern == "solid":
        return np.zeros((height, width), dtype=bool)
    if pattern == "striped":
        coord = (x + 0 * y, y + 0 * x, x + y, x - y + height)[variant % 4]
        return (coord // half) % 2 == 1
    if pattern == "dotted":
        return ((x % period) < half) & ((y % period) < half)
    if pattern == "checkered":
        return ((x // half) + (y // half)) % 2 == 1
    if pattern == "zigzag":
        along, across = (x, y) if variant % 2 == 0 else (y, x)
        wave = np.abs((along % (2 * period)) - period)
        return ((across + wave) // half) % 2 == 1
    if pattern == "speckled":
        cell = max(2, half)
        blocks = rng.random((-(-height // cell), -(-width // cell))) < 0.35
        return np.repeat(np.repeat(blocks, cell, axis=0), cell, axis=1)[:height, :width]
    raise ValueError(f"unknown pattern {pattern!r}")


def _texture(colour: tuple[int, int, int], signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Two tones around ``colour`` whose mean over the mask is the colour itself.  # (h, w, 3) uint8

    Mean-preserving on purpose: once the pattern is blurred away, nothing (not even brightness) tells it.
    """
    c = np.asarray(colour, dtype=np.float64)
    frac = float(signal[mask].mean()) if mask.any() else 0.0
    if frac <= 0.0 or frac >= 1.0:
        return np.broadcast_to(c.astype(np.uint8), (*signal.shape, 3))
    swing = np.minimum(np.minimum(_PATTERN_AMPLITUDE, c / frac), (255.0 - c) / (1.0 - frac))  # (3,)
    tex = c + (signal[..., None].astype(np.float64) - frac) * swing
    return np.clip(np.rint(tex), 0, 255).astype(np.uint8)


# --- geometry -------------------------------------------------------------------------------------------------

def size_word(box: tuple[int, int, int, int] | list[int], width: int, height: int) -> str:
    """tiny / small / medium / large from sqrt(box area / image area), bounds in :data:`SIZE_BOUNDS`."""
    x1, y1, x2, y2 = box
    rel = math.sqrt(max(x2 - x1, 0) * max(y2 - y1, 0) / (width * height))
    for word, bound in zip(SIZES, SIZE_BOUNDS):
        if rel < bound:
            return word
    return SIZES[-1]


def _gaps(a: list[int], b: list[int]) -> tuple[int, int]:
    """Pixels between two boxes along x and y (x2/y2 exclusive); negative where their projections overlap."""
    return max(b[0] - a[2], a[0] - b[2]), max(b[1] - a[3], a[1] - b[3])


def relation(a: list[int], b: list[int]) -> str:
    """How box ``a`` lies relative to box ``b``, from geometry alone.

    ``left of``/``right of``/``above``/``below`` require the boxes to share no column (row); overlapping boxes
    are ``next to``; a diagonal neighbour is ``near`` unless one axis separates them twice as much as the other.
    """
    gx, gy = _gaps(a, b)
    horizontal = "left of" if a[2] <= b[0] else "right of"
    vertical = "above" if a[3] <= b[1] else "below"
    if gx < 0 and gy < 0:
        return "next to"
    if gx >= 0 and gy >= 0:
        if gx > 2 * gy:
            return horizontal
        if gy > 2 * gx:
            return vertical
        return "near"
    return horizontal if gx >= 0 else vertical


def _distance_key(a: list[int], b: list[int]) -> tuple[float, float]:
    gx, gy = _gaps(a, b)
    centres = math.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)
    return math.hypot(max(gx, 0), max(gy, 0)), centres


def nearest(boxes: list[list[int]], i: int) -> int | None:
    """Index of the box nearest to box ``i`` (gap between boxes, then centre distance, then index)."""
    others = [j for j in range(len(boxes)) if j != i]
    return min(others, key=lambda j: (*_distance_key(boxes[i], boxes[j]), j)) if others else None


# --- captions -------------------------------------------------------------------------------------------------

def _noun_phrase(rng: np.random.Generator, shape: str, colour: str, pattern: str, size: str) -> str:
    det = ("a ", "the ", "")[rng.choice(3, p=(0.5, 0.3, 0.2))]
    sized = f"{size} " if rng.random() < 0.6 else ""
    forms = [f"{det}{sized}{colour} {pattern} {shape}", f"{det}{sized}{pattern} {colour} {shape}",
             f"{det}{sized}{colour} {shape} that is {pattern}"]
    if pattern in PATTERN_NOUNS:
        noun = PATTERN_NOUNS[pattern]
        forms += [f"{det}{sized}{colour} {shape} with {noun}", f"{det}{sized}{colour} {shape} covered in {noun}"]
    return forms[int(rng.integers(len(forms)))]


def _caption(rng: np.random.Generator, obj: dict[str, Any], ref: dict[str, Any] | None) -> tuple[str, bool]:
    """A caption for ``obj``, naming its relation to ``ref`` about half the time; and whether it does."""
    text = _noun_phrase(rng, obj["shape"], obj["colour"], obj["pattern"], obj["size"])
    if ref is None or rng.random() >= 0.5:
        return text, False
    phrases = RELATION_PHRASES[obj["relation"]["relation"]]
    phrase = phrases[int(rng.integers(len(phrases)))]
    det = ("a", "the")[int(rng.integers(2))]
    return f"{text} {phrase} {det} {ref['colour']} {ref['shape']}", True


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted: the whole vocabulary of a word-level tokenizer."""
    words = set(_CAPTION_WORDS) | set(SHAPES) | set(COLOURS) | set(PATTERNS) | set(PATTERN_NOUNS.values())
    words |= set(SIZES)
    for phrases in RELATION_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)


# --- scenes ---------------------------------------------------------------------------------------------------

@dataclass
class _Placed:
    """One object as placed: its drawn mask at ``(x, y)`` and what it is."""
    shape: str
    colour: str
    pattern: str
    period: int
    variant: int
    x: int
    y: int
    mask: np.ndarray  # (h, w) bool, the shape's pixels before others cover it
    visible: int = 0


@dataclass
class _Scene:
    width: int
    height: int
    placed: list[_Placed] = field(default_factory=list)
    labels: np.ndarray | None = None  # (H, W) int8: 0 background, k = the k-th placed object on top


def _streams(seed: int, image_id: int) -> list[np.random.Generator]:
    """Independent generators for layout, painting and captions, so each can run without the others."""
    if seed < 0 or image_id < 0:
        raise ValueError(f"seed and image_id must be non-negative, got seed={seed}, image_id={image_id}")
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, image_id]).spawn(3)]


def _box_overlap(box: tuple[int, int, int, int], p: _Placed) -> float:
    """Intersection of ``box`` and ``p``'s box over the smaller of the two."""
    h, w = p.mask.shape
    ix = min(box[2], p.x + w) - max(box[0], p.x)
    iy = min(box[3], p.y + h) - max(box[1], p.y)
    if ix <= 0 or iy <= 0:
        return 0.0
    return ix * iy / min((box[2] - box[0]) * (box[3] - box[1]), w * h)


def _try_place(scene: _Scene, mask: np.ndarray, rng: np.random.Generator, attempts: int) -> tuple[int, int] | None:
    """A position where ``mask`` covers little of anything and little of it is covered; None if none found."""
    h, w = mask.shape
    area = int(mask.sum())
    labels = scene.labels
    assert labels is not None
    if w > scene.width or h > scene.height:
        return None
    for _ in range(attempts):
        x = int(rng.integers(0, scene.width - w + 1))
        y = int(rng.integers(0, scene.height - h + 1))
        if any(_box_overlap((x, y, x + w, y + h), p) > _MAX_BOX_OVERLAP for p in scene.placed):
            continue
        under = np.bincount(labels[y:y + h, x:x + w][mask], minlength=len(scene.placed) + 1)  # (K+1,)
        if under[1:].sum() > _MAX_COVERED * area:
            continue
        if any(under[k + 1] > 0 and p.visible - under[k + 1] < (1 - _MAX_COVERED) * p.mask.sum()
               for k, p in enumerate(scene.placed)):
            continue
        return x, y
    return None


def _layout(rng: np.random.Generator) -> _Scene:
    """Image size and objects: shapes, colours, patterns, masks and positions (no pixels painted yet)."""
    width = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    height = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    scene = _Scene(width, height, labels=np.zeros((height, width), dtype=np.int8))
    count = int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))
    colours = list(COLOURS)
    wanted = []
    for _ in range(count):
        target = int(rng.choice(len(SIZES), p=_SIZE_WEIGHTS))
        wanted.append((target, float(rng.random()), SHAPES[int(rng.integers(len(SHAPES)))],
                       colours[int(rng.integers(len(colours)))], PATTERNS[int(rng.integers(len(PATTERNS)))],
                       int(rng.choice(_PERIODS_ACROSS)), int(rng.integers(4))))
    wanted.sort(key=lambda o: -(o[0] + o[1]))  # largest first: small ones land on top and stay whole
    scale = math.sqrt(width * height)
    for target, u, shape, colour, pattern, across, variant in wanted:
        for size_class in range(target, -1, -1):
            lo, hi = _SIZE_RANGES[size_class]
            side = (lo + u * (hi - lo)) * scale
            aspect = _ASPECT.get(shape, 1.0) * float(rng.uniform(0.9, 1.1))
            w = min(max(side * math.sqrt(aspect), _MIN_OBJECT_PX), 0.8 * width)
            h = min(max(side / math.sqrt(aspect), _MIN_OBJECT_PX), 0.8 * height)
            angle = math.radians(float(rng.uniform(-15, 15)))
            if shape == "arrow":
                angle += math.pi / 2 * int(rng.integers(4))
            mask = _rasterise(shape, w, h, angle)
            at = _try_place(scene, mask, rng, attempts=40 if size_class else 200)
            if at is not None:
                break
        else:
            continue
        x, y = at
        period = max(_MIN_PERIOD_PX, round(math.sqrt(w * h) / across))
        window = scene.labels[y:y + mask.shape[0], x:x + mask.shape[1]]
        for k, p in enumerate(scene.placed):
            p.visible -= int((window[mask] == k + 1).sum())
        window[mask] = len(scene.placed) + 1
        scene.placed.append(_Placed(shape, colour, pattern, period, variant, x, y, mask, int(mask.sum())))
    return scene


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Clutter: a muted base with a gradient, blotches, fine grain and faint lines and outlines."""
    base = rng.uniform(85, 170) + rng.uniform(-18, 18, size=3)  # (3,) greyish with a tint
    gh, gw = height // 32 + 2, width // 32 + 2
    gy, gx = np.mgrid[0:1:gh * 1j, 0:1:gw * 1j]
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * gx + np.sin(angle) * gy - 0.5) * rng.uniform(20, 60)  # (gh, gw)
    coarse = base + ramp[..., None] + rng.normal(0, 10, size=(gh, gw, 1)) + rng.normal(0, 5, size=(gh, gw, 3))
    small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    pixels = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    grain = rng.integers(-3, 4, size=(height, width, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 30))):
        tone = tuple(int(v) for v in np.clip(base + rng.uniform(-28, 28, size=3), 0, 255))
        x1, x2 = sorted(rng.integers(0, width, size=2).tolist())
        y1, y2 = sorted(rng.integers(0, height, size=2).tolist())
        kind = int(rng.integers(3))
        line = int(rng.integers(1, 4))
        if kind == 0:
            draw.line([(x1, y1), (x2, y2)] if rng.random() < 0.5 else [(x1, y2), (x2, y1)], fill=tone, width=line)
        elif kind == 1:
            draw.ellipse([x1, y1, x2, y2], outline=tone, width=line)
        else:
            draw.rectangle([x1, y1, x2, y2], outline=tone, width=line)
    return img


def _paint(scene: _Scene, rng: np.random.Generator) -> Image.Image:
    """The scene's pixels: background, then each object's pattern inside its mask, in placement order."""
    canvas = np.array(_background(rng, scene.width, scene.height))  # (H, W, 3) uint8
    for p in scene.placed:
        h, w = p.mask.shape
        signal = _pattern_signal(p.pattern, h, w, p.period, p.variant, rng)
        window = canvas[p.y:p.y + h, p.x:p.x + w]
        window[p.mask] = _texture(COLOURS[p.colour], signal, p.mask)[p.mask]
    return Image.fromarray(canvas)


def _objects(scene: _Scene, rng: np.random.Generator, image_id: int, with_masks: bool) -> list[dict[str, Any]]:
    """Annotations: tight boxes around what stays visible, sizes, nearest-neighbour relations, captions."""
    labels = scene.labels
    assert labels is not None
    objects: list[dict[str, Any]] = []
    masks = []
    for k, p in enumerate(scene.placed):
        h, w = p.mask.shape
        own = labels[p.y:p.y + h, p.x:p.x + w] == k + 1  # (h, w)
        rows, cols = np.flatnonzero(own.any(axis=1)), np.flatnonzero(own.any(axis=0))
        box = [p.x + int(cols[0]), p.y + int(rows[0]), p.x + int(cols[-1]) + 1, p.y + int(rows[-1]) + 1]
        masks.append(own[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        objects.append({"object_id": image_id * 100 + k + 1, "box": box, "shape": p.shape, "colour": p.colour,
                        "pattern": p.pattern, "size": size_word(box, scene.width, scene.height),
                        "period": p.period})
    boxes = [o["box"] for o in objects]
    neighbours = [nearest(boxes, i) for i in range(len(objects))]
    for i, (obj, j) in enumerate(zip(objects, neighbours)):
        obj["relation"] = None if j is None else {
            "relation": relation(boxes[i], boxes[j]), "object_id": objects[j]["object_id"],
            "shape": objects[j]["shape"], "colour": objects[j]["colour"]}
    for i, (obj, j) in enumerate(zip(objects, neighbours)):
        obj["caption"], obj["mentions_relation"] = _caption(rng, obj, None if j is None else objects[j])
        obj["attributes"] = [obj["colour"], obj["pattern"], obj["size"]]
        if with_masks:
            obj["mask"] = masks[i]
    return objects


def render_scene(seed: int, image_id: int, *, with_masks: bool = False) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Image ``image_id`` of the corpus of ``seed``, alone: the same pixels and objects as in ``write_corpus``.

    Each object: ``object_id``, ``box`` [x1, y1, x2, y2] (ints, x2/y2 exclusive, tight around its visible
    pixels), ``shape``, ``colour``, ``pattern``, ``size``, ``period`` (the pattern's, in pixels), ``relation``
    ({relation, object_id, shape, colour} of its nearest neighbour, or None), ``caption``,
    ``mentions_relation``, ``attributes`` [colour, pattern, size]; with ``with_masks``, ``mask``: its visible
    pixels inside the box, (y2 - y1, x2 - x1) bool.
    """
    layout_rng, paint_rng, caption_rng = _streams(seed, image_id)
    scene = _layout(layout_rng)
    return _paint(scene, paint_rng), _objects(scene, caption_rng, image_id, with_masks)


def _annotations(seed: int, image_id: int) -> tuple[int, int, list[dict[str, Any]]]:
    """Width, height and objects without painting: what a resumed run needs for an image already written."""
    layout_rng, _, caption_rng = _streams(seed, image_id)
    scene = _layout(layout_rng)
    return scene.width, scene.height, _objects(scene, caption_rng, image_id, with_masks=False)


# --- Visual Genome records ------------------------------------------------------------------------------------

def _vg_entries(image_id: int, width: int, height: int, objects: list[dict[str, Any]]) -> tuple[str, str, str, str]:
    """One image's entries of image_data, region_descriptions, objects and attributes, as compact JSON."""
    regions, objs, attrs = [], [], []
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        box = {"x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1}
        regions.append({"region_id": o["object_id"], "image_id": image_id, "phrase": o["caption"],
                        "x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1})
        objs.append({"object_id": o["object_id"], **box, "names": [o["shape"]], "synsets": []})
        attrs.append({**objs[-1], "attributes": list(o["attributes"])})
    image = {"image_id": image_id, "url": f"images/{image_id}.jpg", "width": width, "height": height,
             "coco_id": None, "flickr_id": None}

    def dump(entry: dict[str, Any]) -> str:
        return json.dumps(entry, separators=(",", ":"))

    return (dump(image), dump({"id": image_id, "regions": regions}), dump({"image_id": image_id, "objects": objs}),
            dump({"image_id": image_id, "attributes": attrs}))


_Result = tuple[int, bool, tuple[str, str, str, str], int]  # image id, written now, VG entries, regions


def _make_images(chunk: list[tuple[int, bool]], seed: int, out: str, storage_options: StorageOptions | None,
                 jpeg_quality: int) -> list[_Result]:
    """Render and write the images of one chunk (annotations only for those that exist). Runs in workers."""
    results = []
    for image_id, exists in chunk:
        if exists:
            width, height, objects = _annotations(seed, image_id)
        else:
            image, objects = render_scene(seed, image_id)
            width, height = image.size
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=jpeg_quality)
            storage.write_bytes(storage.join(out, "images", f"{image_id}.jpg"), buf.getvalue(), storage_options)
        results.append((image_id, not exists, _vg_entries(image_id, width, height, objects), len(objects)))
    return results


# --- writing --------------------------------------------------------------------------------------------------

def split_ids(num_images: int, seed: int) -> dict[str, list[int]]:
    """Train/val/test image ids (sorted), about 80/10/10; test and val get one image each from 3 images on."""
    n_test = min(num_images, max(1, round(num_images / 10)))
    n_val = min(num_images - n_test - 1, max(1, round(num_images / 10))) if num_images - n_test > 1 else 0
    order = np.random.default_rng(np.random.SeedSequence([seed, 2**31])).permutation(num_images) + 1
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: sorted(int(i) for i in parts[name]) for name in _SPLITS}


class _JsonList:
    """A JSON list written one entry at a time to a local temporary file, then moved or uploaded whole.

    Only one entry is ever in memory; the target appears complete or not at all.
    """

    def __init__(self, target: str, scratch: str, storage_options: StorageOptions | None):
        self.target, self.storage_options = target, storage_options
        self.local = os.path.join(scratch, os.path.basename(target) + ".partial")
        self.file = open(self.local, "w", encoding="utf-8")
        self.file.write("[")
        self.count = 0

    def add(self, entry: str) -> None:
        self.file.write(("\n" if self.count == 0 else ",\n") + entry)
        self.count += 1

    def commit(self) -> None:
        self.file.write("\n]\n")
        self.file.close()
        if storage.is_remote(self.target):
            fs, path = storage.filesystem(self.target, self.storage_options)
            fs.put_file(self.local, path)
            os.remove(self.local)
        else:
            os.replace(self.local, self.target[len("file://"):] if self.target.startswith("file://") else self.target)

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.local):
            os.remove(self.local)


def _meta(seed: int, num_images: int, complete: bool, **counts: Any) -> dict[str, Any]:
    return {"generator": "dynrefer.synth", "version": GENERATOR_VERSION, "seed": seed, "num_images": num_images,
            "complete": complete, **counts, "shapes": list(SHAPES),
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()}, "patterns": list(PATTERNS),
            "pattern_nouns": PATTERN_NOUNS, "sizes": list(SIZES), "size_bounds": list(SIZE_BOUNDS),
            "relations": list(RELATIONS), "relation_phrases": {k: list(v) for k, v in RELATION_PHRASES.items()},
            "vocabulary": vocabulary()}


def _existing_images(out: str, seed: int, storage_options: StorageOptions | None) -> set[str]:
    """Image files a previous run of the same seed and version left; refuse to mix with anything else."""
    names = set(storage.listdir(storage.join(out, "images"), storage_options))
    meta_uri = storage.join(out, "synth_meta.json")
    if storage.exists(meta_uri, storage_options):
        meta = storage.read_json(meta_uri, storage_options)
        found = (meta.get("seed"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        if found != (seed, GENERATOR_VERSION):
            raise ValueError(f"{meta_uri}: holds a corpus of seed {found[0]}, generator version {found[1]}; "
                             f"refusing to mix it with seed {seed}, version {GENERATOR_VERSION} (use another --out)")
    elif names:
        raise ValueError(f"{storage.join(out, 'images')}: has files but {meta_uri} is missing; "
                         f"refusing to mix a synthetic corpus into it (use another --out)")
    return names


def _results(chunks: Iterable[list[tuple[int, bool]]], args: tuple[Any, ...], workers: int) -> Iterator[_Result]:
    """Chunks' results in order; with several workers, a bounded window of chunks is in flight at a time."""
    if workers <= 1:
        for chunk in chunks:
            yield from _make_images(chunk, *args)
        return
    with ThreadPoolExecutor(workers) as pool:
        queue = iter(chunks)
        pending: deque[Future[list[_Result]]] = deque(
            pool.submit(_make_images, chunk, *args) for chunk in itertools.islice(queue, 3 * workers))
        while pending:
            done = pending.popleft().result()
            chunk = next(queue, None)
            if chunk is not None:
                pending.append(pool.submit(_make_images, chunk, *args))
            yield from done


def write_corpus(out: str, num_images: int, seed: int = 0, storage_options: StorageOptions | None = None,
                 jpeg_quality: int = 95, progress: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Generate the corpus of ``seed`` with images 1..``num_images`` under ``out`` (a directory or s3:// prefix).

    Images already under ``out/images`` (from an interrupted run of the same seed) are kept, not redrawn; the
    annotation files are rewritten whole. Images are rendered and written by ``workers`` threads (default 2,
    8 for s3:// where writes wait on the network; NumPy, PIL's encoder and uploads release the GIL); the bytes
    never depend on them. Memory stays flat in ``num_images`` apart from the split lists and the listing of
    existing images (tens of bytes per image); the annotation files are streamed one image at a time through
    local temporary files, so the local disk needs room for them (about 3.5 KB per image).

    Returns {"out", "images", "images_written", "images_kept", "regions", "seconds", "images_per_second"}.
    """
    if not 1 <= num_images <= 10**7:
        raise ValueError(f"num_images must be between 1 and 10,000,000, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be between 1 and 100, got {jpeg_quality}")
    start = time.perf_counter()
    existing = _existing_images(out, seed, storage_options)
    storage.write_json(storage.join(out, "synth_meta.json"), _meta(seed, num_images, False), storage_options)
    if workers is None:
        workers = 8 if storage.is_remote(out) else 2
    chunks = ([(i, f"{i}.jpg" in existing) for i in range(lo, min(lo + _CHUNK, num_images + 1))]
              for lo in range(1, num_images + 1, _CHUNK))
    if storage.is_remote(out):
        scratch = tempfile.mkdtemp(prefix="dynrefer-synth-")
    else:
        root = out[len("file://"):] if out.startswith("file://") else out
        os.makedirs(root, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".synth-", dir=root)
    names = ("image_data.json", "region_descriptions.json", "objects.json", "attributes.json")
    lists = [_JsonList(storage.join(out, name), scratch, storage_options) for name in names]
    written = regions = 0
    try:
        from tqdm import tqdm

        with tqdm(total=num_images, desc="synth", unit="img", disable=not progress) as bar:
            for _, new, entries, n in _results(chunks, (seed, out, storage_options, jpeg_quality), workers):
                for stream, entry in zip(lists, entries):
                    stream.add(entry)
                written += new
                regions += n
                bar.update(1)
        for stream in lists:
            stream.commit()
    finally:
        for stream in lists:
            if not stream.file.closed:
                stream.discard()
        shutil.rmtree(scratch, ignore_errors=True)
    splits = split_ids(num_images, seed)
    for name, ids in splits.items():
        storage.write_json(storage.join(out, "splits", f"{name}.json"), ids, storage_options)
    seconds = time.perf_counter() - start
    storage.write_json(storage.join(out, "synth_meta.json"),
                       _meta(seed, num_images, True, regions=regions,
                             splits={k: len(v) for k, v in splits.items()}), storage_options)
    return {"out": out, "images": num_images, "images_written": written, "images_kept": num_images - written,
            "regions": regions, "seconds": round(seconds, 3), "images_per_second": round(num_images / seconds, 2)}
