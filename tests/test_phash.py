import imagehash
import numpy as np
import pytest
import scipy.fft
import scipy.fftpack
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_images

from dynrefer import phash
from dynrefer.phash import hamming, phash_batch, phash_images, phash_official, select_views
from dynrefer.views import CANDIDATE_TS, REDUCING_GAP, crop_views, region_views

RNG = np.random.default_rng(0)
TS = (0.0,) + CANDIDATE_TS
RGB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel")
GRAY_PHOTOS = ("camera", "coins", "moon", "page", "text", "clock")
#: The code of a constant non-black view: only the DC coefficient is above the (zero) median.
CONSTANT_CODE = 1 << 63


def reference(images):
    """imagehash's phash of each PIL image, as the integer of its hex string."""
    return np.array([int(str(imagehash.phash(im)), 16) for im in images], dtype=np.uint64)


def reference_arrays(arrays):
    return reference([Image.fromarray(a) for a in arrays])


def photos():
    """RGB photos that ship with scikit-image and scikit-learn (no download)."""
    images = [getattr(skimage.data, name)() for name in RGB_PHOTOS]
    return images + list(load_sample_images().images)


def random_box(width, height):
    x1, x2 = sorted(RNG.uniform(-10, width + 10, 2))
    y1, y2 = sorted(RNG.uniform(-10, height + 10, 2))
    return [x1, y1, x2 + 3, y2 + 3]


def valid_box(width, height):
    while True:
        box = random_box(width, height)
        if min(box[2], width) - max(box[0], 0) >= 1 and min(box[3], height) - max(box[1], 0) >= 1:
            return box


def assert_codes_equal(codes, expected):
    assert codes.dtype == np.uint64 and codes.shape == expected.shape
    wrong = np.flatnonzero(codes != expected)
    assert len(wrong) == 0, f"{len(wrong)} of {len(codes)} codes differ, first at {wrong[:5].tolist()}"


def test_views_of_photos_match_imagehash():
    count = 0
    for k, photo in enumerate(photos()):
        image = Image.fromarray(photo)
        for size in (224, 32, 57, 19):
            views = np.concatenate([
                region_views(image, valid_box(*image.size), TS, size)[2] for _ in range(3 if size == 224 else 1)
            ])
            assert_codes_equal(phash_batch(views), reference_arrays(views))
            count += len(views)
    assert count >= 500


def test_views_of_random_images_match_imagehash():
    views = []
    for _ in range(6):
        width, height = (int(v) for v in RNG.integers(40, 700, 2))
        image = Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))
        boxes = np.array([region_views(image, valid_box(width, height), RNG.uniform(0, 1, 3), 96)[0]
                          for _ in range(10)]).reshape(-1, 4)
        views.append(crop_views(image, boxes, 96))
    views = np.concatenate(views)
    assert len(views) == 180
    assert_codes_equal(phash_batch(views), reference_arrays(views))


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 2), (1, 40), (40, 1), (5, 32), (32, 5), (31, 33),
                                   (32, 32), (33, 32), (32, 100), (100, 32), (7, 300), (300, 7), (40, 100),
                                   (300, 40), (33, 34), (500, 20), (20, 500), (224, 224), (700, 640)])
def test_any_view_size_matches_imagehash(shape):
    # Raw crops of photos, no resize: tiny, non-square, tall (vertical pass first), already-32 sides.
    height, width = shape
    crops = []
    for photo in photos()[:4]:
        y = int(RNG.integers(0, photo.shape[0] - height + 1)) if height <= photo.shape[0] else 0
        x = int(RNG.integers(0, photo.shape[1] - width + 1)) if width <= photo.shape[1] else 0
        crop = np.resize(photo[y:y + height, x:x + width], (height, width, 3)).astype(np.uint8)
        crops += [crop, crop[..., 1].copy()]
    crops.append(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))
    crops.append(np.full((height, width, 3), 173, dtype=np.uint8))
    codes = phash_images(crops)
    assert_codes_equal(codes, reference_arrays(crops))
    assert_codes_equal(phash_batch(np.stack(crops[0:-2:2])), codes[0:-2:2])
    assert_codes_equal(phash_batch(np.stack(crops[1:-2:2])), codes[1:-2:2])
    assert codes[-1] == CONSTANT_CODE


def test_constant_views():
    colours = [0, 1, 128, 255]
    views = np.stack([np.full((224, 224, 3), c, dtype=np.uint8) for c in colours]
                     + [np.full((224, 224, 3), (255, 0, 17), dtype=np.uint8)])
    codes = phash_batch(views)
    assert_codes_equal(codes, reference_arrays(views))
    assert codes.tolist() == [0] + [CONSTANT_CODE] * 4


def test_grayscale_photos_match_their_rgb_version():
    # A mode-L photo hashed by imagehash equals its RGB conversion hashed here (R = G = B = L).
    for name in GRAY_PHOTOS:
        gray = Image.fromarray(getattr(skimage.data, name)())
        assert gray.mode == "L"
        rgb = gray.convert("RGB")
        boxes = np.array([region_views(rgb, valid_box(*gray.size), TS[:1], 8)[0][0] for _ in range(8)])
        expected = reference([gray.crop(tuple(b)) for b in boxes.tolist()])
        assert_codes_equal(phash_images([np.asarray(rgb.crop(tuple(b))) for b in boxes.tolist()]), expected)
        assert_codes_equal(phash_images([gray.crop(tuple(b)) for b in boxes.tolist()]), expected)
        # Bicubic resizing commutes with L -> RGB too, so crop_views on the RGB image agrees as well.
        views = crop_views(rgb, boxes, 64)
        assert_codes_equal(phash_batch(views), reference([
            gray.resize((64, 64), Image.BICUBIC, box=tuple(b), reducing_gap=REDUCING_GAP) for b in boxes.tolist()]))
        assert_codes_equal(phash_batch(views[..., 0]), phash_batch(views))


def rgba_and_palette_images():
    logo = Image.fromarray(skimage.data.logo())
    assert logo.mode == "RGBA"
    astronaut = Image.fromarray(skimage.data.astronaut())
    varied_alpha = astronaut.convert("RGBA")
    varied_alpha.putalpha(Image.fromarray(RNG.integers(0, 256, astronaut.size[::-1], dtype=np.uint8)))
    coffee = Image.fromarray(skimage.data.coffee())
    return [logo, varied_alpha, coffee.quantize(64), astronaut.convert("P"), logo.convert("P")]


def test_rgba_and_palette_equal_rgb_then_l():
    for image in rgba_and_palette_images():
        assert image.mode in ("RGBA", "P")
        # The claim phash_images relies on: for these modes, convert('L') == convert('RGB').convert('L').
        assert np.array_equal(np.asarray(image.convert("L")), np.asarray(image.convert("RGB").convert("L")))
        rgb = image.convert("RGB")
        boxes = [tuple(int(v) for v in region_views(rgb, valid_box(*image.size), TS[:1], 8)[0][0])
                 for _ in range(10)]
        expected = reference([image.crop(b) for b in boxes])
        assert_codes_equal(phash_images([np.asarray(rgb.crop(b)) for b in boxes]), expected)
        assert_codes_equal(phash_images([image.crop(b) for b in boxes]), expected)


def test_16_bit_and_other_modes():
    values = RNG.integers(0, 600, (50, 70)).astype(np.uint16)
    values[:10] = RNG.integers(0, 256, (10, 70))
    wide = Image.fromarray(values)
    assert wide.mode == "I;16"
    astronaut = Image.fromarray(skimage.data.astronaut())
    images = [wide, Image.fromarray(values.clip(0, 255)), astronaut.convert("LA"), astronaut.convert("CMYK"),
              astronaut.convert("1"), astronaut.convert("L").convert("F")]
    assert_codes_equal(phash_images(images), reference(images))


def test_exact_fallback_alone_matches_imagehash(monkeypatch):
    # With the float32 guard disabled, every output byte is recomputed exactly: still imagehash's codes.
    original = phash._axis

    def always_exact(in_size):
        axis = original(in_size)
        return axis._replace(limit=np.float32(0.0))

    monkeypatch.setattr(phash, "_axis", always_exact)
    views = [np.asarray(Image.fromarray(p).resize((s, s), Image.BICUBIC)) for p, s in zip(photos(), (40, 64, 90, 33))]
    views += [RNG.integers(0, 256, (70, 20, 3), dtype=np.uint8), RNG.integers(0, 256, (20, 70), dtype=np.uint8)]
    assert_codes_equal(phash_images(views), reference_arrays(views))


def test_thumbnails_equal_pillow_pixel_for_pixel():
    # Stricter than the hash: the 32x32 LANCZOS thumbnail itself, for views laid side by side.
    for height, width in [(224, 224), (57, 301), (301, 57), (32, 90), (90, 32), (3, 5), (32, 32), (1000, 40)]:
        views = RNG.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
        views[1] = np.resize(skimage.data.astronaut(), (height, width, 3))
        planes = np.empty(views.size, dtype=np.float32)
        gray = np.empty(views[..., 0].size, dtype=np.float32)
        thumbs = phash._resize(phash._gray(views, planes, gray))  # (32, 3, 32)
        for i, view in enumerate(views):
            expected = np.asarray(Image.fromarray(view).convert("L").resize((32, 32), Image.LANCZOS))
            assert np.array_equal(thumbs[:, i], expected), (height, width, i)


def test_dct_block_is_bitwise_imagehash_dct():
    # The batched DCT must give the very floats of imagehash's per-image calls, or bits near the median flip.
    views = np.concatenate([region_views(Image.fromarray(p), valid_box(p.shape[1], p.shape[0]), TS, 48)[2]
                            for p in photos()[:3]])
    views[0] = 77
    expected = []
    for view in views:
        pixels = np.asarray(Image.fromarray(view).convert("L").resize((32, 32), Image.LANCZOS))
        expected.append(scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8].ravel())
    assert np.array_equal(phash._low_frequencies(views), np.array(expected))


def test_code_bit_order_is_imagehash_hex():
    view = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((64, 64)))
    code = int(phash_batch(view[None])[0])
    image_hash = imagehash.phash(Image.fromarray(view))
    assert f"{code:016x}" == str(image_hash)
    assert [bool(code >> (63 - i) & 1) for i in range(64)] == image_hash.hash.flatten().tolist()


def test_inputs_are_checked():
    assert phash_batch(np.zeros((0, 10, 10, 3), dtype=np.uint8)).shape == (0,)
    assert phash_images([]).shape == (0,)
    with pytest.raises(ValueError, match="uint8"):
        phash_batch(np.zeros((2, 10, 10, 3)))
    with pytest.raises(ValueError, match="shape"):
        phash_batch(np.zeros((2, 10, 10, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="1x1"):
        phash_batch(np.zeros((2, 0, 10), dtype=np.uint8))
    with pytest.raises(ValueError):
        phash_images([np.zeros((10, 10, 4), dtype=np.uint8)])


def test_hamming():
    assert hamming(np.uint64(0), np.uint64(0xFF)) == 8
    assert hamming(0, 2**64 - 1) == 64
    assert hamming(0x8000000000000001, 1) == 1
    assert hamming(np.array([0, 3, 2**63], dtype=np.uint64), np.uint64(1)).tolist() == [1, 1, 2]
    a = np.array([[0b1010], [0b0110]], dtype=np.uint64)
    assert hamming(a, a.T).tolist() == [[0, 2], [2, 0]]
    images = [Image.fromarray(p).resize((50, 40)) for p in photos()[:4]]
    codes = phash_images(images)
    for i in range(4):
        for j in range(4):
            assert hamming(codes[i], codes[j]) == imagehash.phash(images[i]) - imagehash.phash(images[j])


def test_select_views_by_hamming_per_t():
    codes = np.array([0, 0b1111, 0xFF, 0xFF, 0b11], dtype=np.uint64)  # distances 4, 8, 8, 2
    ts = [0.0, 0.1, 0.2, 0.4, 0.5]  # scores 40, 40, 20, 4
    assert select_views(codes, ts, 1) == [0]
    assert select_views(codes, ts, 2) == [0, 1]  # 40 = 40: the smaller t wins
    assert select_views(codes, ts, 3) == [0, 1, 2]
    assert select_views(codes, ts, 4) == [0, 1, 2, 3]
    assert select_views(codes, ts, 5) == [0, 1, 2, 3, 4]


def test_select_views_returns_pick_order_starting_at_region():
    codes = np.array([0, 1, 0b111, 0, 0xFFFF, 0b11], dtype=np.uint64)  # distances 1, 3, 0, 16, 2
    ts = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]  # scores 10, 10, 0, 17.8, 2
    assert select_views(codes, ts, 2) == [0, 4]
    assert select_views(codes, ts, 3) == [0, 4, 1]  # best first; 10 = 10: t=0.1 before t=0.3
    assert select_views(codes, ts, 4) == [0, 4, 1, 2]
    # Candidates need not come in t order. All four score 10: the smaller t wins, then the earlier index.
    codes = np.array([0, 0b11, 1, 0b11, 0b11], dtype=np.uint64)
    ts = [0.0, 0.2, 0.1, 0.2, 0.2]
    assert select_views(codes, ts, 2) == [0, 2]
    assert select_views(codes, ts, 3) == [0, 2, 1]
    assert select_views(codes, ts, 4) == [0, 2, 1, 3]
    assert select_views(codes, ts, 5) == [0, 2, 1, 3, 4]


def official_greedy(codes, ts, n):
    """The official DynRefer loop: argmax of hamming / t, zeroing each pick (first index wins ties)."""
    difference = np.array([hamming(codes[0], c) / t for c, t in zip(codes[1:], ts[1:])])
    chosen = []
    for _ in range(n - 1):
        chosen.append(int(difference.argmax()) + 1)
        difference[chosen[-1] - 1] = 0
    return chosen


def test_select_views_agrees_with_the_official_greedy_loop():
    for _ in range(200):
        codes = RNG.integers(0, 2**63, 11, dtype=np.uint64) * np.uint64(2) + RNG.integers(0, 2, 11).astype(np.uint64)
        codes[1:] = codes[0] ^ (codes[1:] & np.uint64(RNG.integers(1, 2**63)))  # some near-duplicates
        n = int(RNG.integers(1, 11))
        selected = select_views(codes, TS, n)
        assert selected[0] == 0
        if (hamming(codes[0], codes[1:]) > 0).sum() >= n - 1:
            assert selected[1:] == official_greedy(codes, TS, n)  # the same views, in the same order


def test_select_views_rejects_bad_input():
    codes = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="n >= 1"):
        select_views(codes, [0, 0.1, 0.2, 0.3], 0)
    with pytest.raises(ValueError, match="only 3 candidates"):
        select_views(codes, [0, 0.1, 0.2, 0.3], 5)
    with pytest.raises(ValueError, match="t > 0"):
        select_views(codes, [0, 0.1, 0.0, 0.3], 2)
    with pytest.raises(ValueError, match="t > 0"):
        select_views(codes, [0, 0.1, -0.2, 0.3], 2)
    with pytest.raises(ValueError, match="one t per view"):
        select_views(codes, [0, 0.1, 0.2], 2)
    with pytest.raises(ValueError, match="t=0"):
        select_views(codes, [0.1, 0.2, 0.3, 0.4], 2)


def cv2_official_hash(image: np.ndarray, box) -> int:
    """The official code's hash, with OpenCV as it runs it: grey, crop, 224x224 INTER_LINEAR, DCT, 8x8, mean."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    x1, y1, x2, y2 = box
    low = cv2.dct(cv2.resize(gray[y1:y2, x1:x2], (224, 224)))[:8, :8]
    return int("".join("1" if b else "0" for b in (low > low.mean()).reshape(-1)), 2)


def test_phash_official_crops_equal_opencv():
    image = skimage.data.astronaut()
    boxes = np.array([[0, 0, 512, 512], [100, 50, 300, 260], [10, 20, 40, 90], [3, 3, 500, 100], [200, 300, 201, 420]])
    gray = phash.official_gray(image)
    import cv2

    assert np.array_equal(gray, cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32))
    assert phash.phash_official_crops(gray, boxes).tolist() == [cv2_official_hash(image, b) for b in boxes.tolist()]


def test_phash_official_is_the_mean_thresholded_dct_of_the_whole_view():
    import cv2

    views = crop_views(Image.fromarray(skimage.data.astronaut()), np.array([[0, 0, 512, 512], [100, 50, 300, 260]]),
                       224)
    expected = [cv2_official_hash(v, (0, 0, 224, 224)) for v in views]
    assert phash_official(views).tolist() == expected
    assert phash_official(views[:, ::2, ::3]).shape == (2,)
    assert phash_official(views[..., 0]).dtype == np.uint64
    assert np.array_equal(phash.official_gray(views[0]), cv2.cvtColor(views[0], cv2.COLOR_RGB2GRAY).astype(np.float32))


def test_prepare_hash_option_switches_the_codes():
    from dynrefer.preprocess import PrepareConfig, region_rows

    image = Image.fromarray(skimage.data.astronaut())
    record = {"image_id": "a", "file": "a.png", "regions": [{"region_id": "r", "box": [100, 50, 300, 260]}]}
    rows, _ = region_rows(record, image, PrepareConfig(view_size=64, hash="official"))
    boxes = rows[0]["view_boxes"]
    assert rows[0]["phash"] == [cv2_official_hash(skimage.data.astronaut(), b) for b in boxes]
    default, _ = region_rows(record, image, PrepareConfig(view_size=64))
    assert default[0]["phash"] != rows[0]["phash"]
    with pytest.raises(ValueError, match="prepare.hash"):
        PrepareConfig(hash="md5")


@pytest.mark.parametrize("in_size", [1, 5, 33, 57, 224, 1000])
def test_float32_sums_stay_inside_the_rounding_guard(in_size):
    axis = phash._axis(in_size)
    signs = np.sign(axis.dense)  # (32, in_size)
    x = np.concatenate([RNG.integers(0, 256, (300, in_size)), np.full((2, in_size), 255),
                        np.where(signs > 0, 255, 0), np.where(signs < 0, 255, 0)]).astype(np.float32)
    exact = x.astype(np.float64) @ axis.dense.T  # (M, 32)
    assert np.abs(phash._horizontal_sums(x, axis) - exact).max() < 0.5 - axis.limit
    assert np.abs(phash._vertical_sums(np.ascontiguousarray(x.T), axis) - exact.T).max() < 0.5 - axis.limit
    assert 0.49 < axis.limit < 0.5


def test_rounding_guard_sends_near_halves_to_the_exact_sum():
    # 2.4999995 is a float32 sum whose exact value may be 2.5, which Pillow rounds up to 3; 1.2 is safe.
    acc = np.array([[2.4999995, 1.2], [-3.0, 300.0]], dtype=np.float32)
    asked = []

    def exact(rows, cols):
        asked.append(list(zip(rows.tolist(), cols.tolist())))
        return np.full(len(rows), 2.5)

    rounded = phash._round_bytes(acc, phash._axis(224).limit, exact)
    assert asked == [[(0, 0)]]
    assert rounded.tolist() == [[3.0, 1.0], [0.0, 255.0]]
