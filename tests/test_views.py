import numpy as np
import pytest
from PIL import Image

from dynrefer.views import (CANDIDATE_TS, crop_views, region_in_views, region_views, roi_to_image, validate_box,
                            view_boxes)

RNG = np.random.default_rng(0)


def random_box(width, height):
    x1, x2 = sorted(RNG.uniform(-20, width + 20, 2))
    y1, y2 = sorted(RNG.uniform(-20, height + 20, 2))
    return [x1, y1, x2 + 2, y2 + 2]


def test_candidates_are_the_official_ten():
    assert CANDIDATE_TS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_t0_is_clipped_region_and_t1_is_image():
    boxes = view_boxes([-10, 5.5, 30.2, 900], 100, 80, [0.0, 1.0])
    assert boxes[0].tolist() == [0, 5, 31, 80]
    assert boxes[1].tolist() == [0, 0, 100, 80]


@pytest.mark.parametrize("trial", range(50))
def test_views_nest_monotonically_and_contain_the_region(trial):
    width, height = RNG.integers(20, 1200, 2)
    try:
        box = validate_box(random_box(width, height), width, height)
    except ValueError:
        return
    ts = np.linspace(0, 1, 11)
    boxes = view_boxes(box, width, height, ts)
    assert (boxes[:, 0] <= box[0]).all() and (boxes[:, 1] <= box[1]).all()
    assert (boxes[:, 2] >= box[2]).all() and (boxes[:, 3] >= box[3]).all()
    assert (np.diff(boxes[:, :2], axis=0) <= 0).all() and (np.diff(boxes[:, 2:], axis=0) >= 0).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


@pytest.mark.parametrize("trial", range(50))
def test_region_in_views_maps_back_within_one_pixel(trial):
    width, height = RNG.integers(20, 1200, 2)
    try:
        box = validate_box(random_box(width, height), width, height)
    except ValueError:
        return
    boxes = view_boxes(box, width, height, RNG.uniform(0, 1, 6))
    rois = region_in_views(box, boxes, 224)
    assert rois.min() >= 0 and rois.max() <= 224
    back = roi_to_image(rois, boxes, 224)
    assert np.abs(back - box[None, :]).max() < 1.0


def test_region_in_views_of_t0_fills_the_view():
    rois = region_in_views([10, 20, 30, 60], view_boxes([10, 20, 30, 60], 100, 100, [0.0]), 224)
    np.testing.assert_allclose(rois[0], [0, 0, 224, 224])


@pytest.mark.parametrize("box, why", [
    ([10, 10, 10, 20], "zero or negative area"),
    ([10, 10, 20, 10], "zero or negative area"),
    ([30, 10, 20, 20], "zero or negative area"),
    ([-50, -50, -10, -10], "outside"),
    ([200, 10, 300, 20], "outside"),
    ([float("nan"), 0, 10, 10], "not finite"),
    ([0, 0, float("inf"), 10], "not finite"),
    ([1, 2, 3], "4 numbers"),
])
def test_bad_boxes_raise_value_error_naming_the_box(box, why):
    with pytest.raises(ValueError, match=why) as e:
        view_boxes(box, 100, 80, [0.0])
    assert "box" in str(e.value)


def test_bad_coefficients_raise():
    with pytest.raises(ValueError, match="coefficients"):
        view_boxes([0, 0, 10, 10], 100, 80, [0.0, 1.5])


def test_crop_views_matches_pil_resize_of_each_box():
    image = Image.fromarray(RNG.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    boxes, rois, pixels = region_views(image, [300, 200, 500, 450], [0.0, 0.5, 1.0, 1.0], 32)
    assert pixels.shape == (4, 32, 32, 3) and pixels.dtype == np.uint8
    for box, view in zip(boxes, pixels):
        expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC, box=tuple(box), reducing_gap=2.0))
        np.testing.assert_array_equal(view, expected)
        direct = np.asarray(image.crop(tuple(box)).resize((32, 32), Image.Resampling.BICUBIC), dtype=float)
        assert np.abs(view - direct)[2:-2, 2:-2].mean() < 3  # the reducing gap barely changes the pixels
    np.testing.assert_allclose(rois[0], [0, 0, 32, 32])


def test_crop_views_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        crop_views(Image.new("L", (10, 10)), np.array([[0, 0, 5, 5]]), 8)
