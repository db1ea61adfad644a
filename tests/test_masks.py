"""Region masks: COCO RLE (against pycocotools), PNG and base64 masks, an image's alpha channel, and masks in the
Python API."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dynrefer.masks import MaskError, alpha_mask, decode_mask, rle_counts, rle_decode, rle_encode, rle_string

coco = pytest.importorskip("pycocotools.mask")


def random_masks(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        if i % 3 == 0:  # one rectangle: long runs, counts that need several 5-bit groups and negative deltas
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):, rng.integers(0, w):] = True
        else:
            m = rng.random((h, w)) < rng.random()
        yield m


def test_rle_reads_what_pycocotools_writes_and_writes_what_it_reads():
    big = np.zeros((480, 640), bool)
    big[100:400, 50:600] = True  # runs of tens of thousands of pixels
    for m in [*random_masks(), big, np.ones((7, 5), bool), np.zeros((7, 5), bool)]:
        ref = coco.encode(np.asfortranarray(m.astype(np.uint8)))
        compressed = {"size": [int(v) for v in ref["size"]], "counts": ref["counts"].decode()}
        np.testing.assert_array_equal(rle_decode(compressed), m)
        np.testing.assert_array_equal(coco.decode(ref).astype(bool), m)
        plain = rle_encode(m)
        np.testing.assert_array_equal(rle_decode(plain), m)
        assert rle_string(plain["counts"]) == compressed["counts"]
        assert rle_counts(compressed["counts"]) == plain["counts"]
        # pycocotools reads our uncompressed form to the same string
        assert coco.frPyObjects(plain, *plain["size"])["counts"].decode() == compressed["counts"]


@pytest.mark.parametrize("rle,match", [
    ({"size": [2, 3], "counts": [1, 2]}, "add up to 3 pixels"),
    ({"size": [2, 3], "counts": [7, -1]}, "negative"),
    ({"size": [2, 0], "counts": []}, "two positive integers"),
    ({"size": [2, True], "counts": [2]}, "two positive integers"),
    ({"size": [100_000, 100_000], "counts": [1]}, "exceeds the limit"),
    ({"size": [2, 3], "counts": "6\x7f"}, "outside"),
    ({"size": [2, 3], "counts": "o"}, "ends inside a count"),
    ({"size": [2, 3], "counts": "o" * 100_000 + "0"}, "65 bits"),
    ({"size": [2, 3], "counts": "0" * 100_000}, "more runs"),
    ({"size": [2, 3], "counts": [1.5, 4.5]}, "list of integers"),
])
def test_bad_rle_is_refused_cheaply_with_a_reason(rle, match):
    with pytest.raises(MaskError, match=match):
        rle_decode(rle, "masks[0]")


def png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG", **save)
    return out.getvalue()


def test_png_and_base64_masks_and_the_alpha_channel():
    m = np.zeros((30, 40), bool)
    m[5:20, 8:33] = True
    grey = png(m.astype(np.uint8) * 255)
    np.testing.assert_array_equal(decode_mask(grey), m)
    np.testing.assert_array_equal(decode_mask("data:image/png;base64," + base64.b64encode(grey).decode()), m)
    np.testing.assert_array_equal(decode_mask(png(m)), m)  # mode "1"
    rgba = np.dstack([np.full((30, 40, 3), 255, np.uint8), m.astype(np.uint8) * 255])
    np.testing.assert_array_equal(decode_mask(png(rgba)), m)  # white everywhere: the alpha is the mask
    palette = Image.fromarray(m.astype(np.uint8), "L").convert("P")
    out = io.BytesIO()
    palette.save(out, format="PNG")
    np.testing.assert_array_equal(decode_mask(out.getvalue()), m)
    with pytest.raises(MaskError, match="base64 PNG"):
        decode_mask("not base64 at all!")
    with pytest.raises(MaskError, match="not a readable image"):
        decode_mask(b"GIF? no")
    with pytest.raises(MaskError, match="exceeds the limit"):
        decode_mask(grey, max_pixels=100)

    picture = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    alpha = np.where(m, 255, 0).astype(np.uint8)
    alpha[0, 0] = 100  # under half opaque: outside
    np.testing.assert_array_equal(alpha_mask(png(np.dstack([picture, alpha]))), m)
    assert alpha_mask(png(picture)) is None  # no alpha channel
    assert alpha_mask(png(np.dstack([picture, np.full((30, 40), 255, np.uint8)]))) is None  # opaque everywhere


def test_python_api_takes_rle_png_and_base64_masks(tmp_path):
    import dynrefer
    from dynrefer.checkpoint import save_pretrained
    from dynrefer.config import load_config
    from dynrefer.model import DynRefer

    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg.language.max_new_tokens = 3
    save_pretrained(DynRefer(cfg), str(tmp_path / "export"))
    model = dynrefer.load(str(tmp_path / "export"))
    picture = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    m = np.zeros((90, 120), bool)
    m[12:40, 30:75] = True
    ref = coco.encode(np.asfortranarray(m.astype(np.uint8)))
    rle = {"size": [90, 120], "counts": ref["counts"].decode()}
    by_box = model.caption(picture, boxes=[[30, 12, 75, 40]])[0]
    for given in (m, rle, rle_encode(m), png(m.astype(np.uint8) * 255),
                  base64.b64encode(png(m.astype(np.uint8) * 255)).decode()):
        (region,) = model.caption(picture, masks=[given])
        assert region.box == [30.0, 12.0, 75.0, 40.0] and region.mask_id == 0
        assert region.caption == by_box.caption and [v.box for v in region.views] == [v.box for v in by_box.views]
