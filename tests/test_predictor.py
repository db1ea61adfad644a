"""The Python API: dynrefer.load and Predictor.caption / dense on ordinary images, masks and odd image kinds."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import dynrefer
from dynrefer.batching import build_inputs
from dynrefer.checkpoint import save_pretrained
from dynrefer.config import load_config
from dynrefer.model import DynRefer
from dynrefer.predictor import Predictor, mask_box, to_image

WORDS = "a the red blue green small large striped dotted circle square triangle left of right".split()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg.language.vocabulary = WORDS
    cfg.language.max_new_tokens = 4
    cfg.tags.vocabulary = ["red", "blue", "circle"]
    cfg.tags.threshold = 0.0
    cfg.recognition.categories = ["circle", "square"]
    cfg.recognition.attributes = ["red", "blue"]
    path = tmp_path_factory.mktemp("api") / "export"
    save_pretrained(DynRefer(cfg), str(path))
    return str(path)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)


def test_load_caption_gives_regions_with_views_and_equals_the_model_on_its_inputs(export, picture):
    model = dynrefer.load(export)
    assert isinstance(model, Predictor)
    boxes = [[10, 10, 50, 40], [60, 20, 110, 80], [5, 5, 115, 85]]
    regions = model.caption(Image.fromarray(picture), boxes=boxes, texts=["a red circle"])
    assert [r.box for r in regions] == [[float(v) for v in b] for b in boxes]
    for r in regions:
        assert isinstance(r.caption, str) and 0 < r.caption_score <= 1
        assert [v.t for v in r.views][0] == 0.0 and len(r.views) == 3
        assert r.views[0].box == [int(v) for v in r.box]  # t=0 is the region itself
        assert r.category in ("circle", "square") and set(r.text_scores) == {"a red circle"}
        assert [t for t, _ in r.tags] and all(0 <= s <= 1 for _, s in r.tags)
    # the same numbers as the model on inputs built by the batch code
    rows_model = model.model
    from dynrefer.predictor import image_inputs

    inputs = image_inputs(to_image(picture), boxes, rows_model)
    direct = rows_model.predict(*(torch.from_numpy(a) for a in (inputs.views, inputs.view_index, inputs.rois)),
                                texts=["a red circle"])
    assert [r.caption for r in regions] == [p.caption for p in direct]
    assert [r.caption_score for r in regions] == pytest.approx([p.caption_score for p in direct])
    assert [r.views[1].t for r in regions] == inputs.ts[:, 1].round(6).tolist()


def test_every_image_kind_gives_the_same_captions(export, picture, tmp_path):
    model = dynrefer.load(export)
    box = [[20, 15, 70, 60]]
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    (tmp_path / "p.png").write_bytes(png.getvalue())
    rgba = np.concatenate([picture, np.full((*picture.shape[:2], 1), 255, np.uint8)], axis=2)
    kinds = [picture, Image.fromarray(picture), png.getvalue(), str(tmp_path / "p.png"), tmp_path / "p.png", rgba,
             Image.fromarray(picture).convert("CMYK").convert("RGB")]
    captions = {model.caption(k, boxes=box)[0].caption for k in kinds[:6]}
    assert len(captions) == 1
    for odd in (Image.fromarray(picture).convert("P"), Image.fromarray(picture).convert("CMYK"),
                (picture.astype(np.uint16) * 257), Image.fromarray(picture[..., 0]).convert("I;16")):
        assert isinstance(model.caption(odd, boxes=box)[0].caption, str)


def test_masks_become_their_tight_boxes(export, picture):
    model = dynrefer.load(export)
    mask = np.zeros(picture.shape[:2], bool)
    mask[12:40, 30:75] = True
    mask[41, 80] = True
    assert mask_box(mask) == [30.0, 12.0, 81.0, 42.0]
    alpha = Image.fromarray(np.dstack([picture, mask.astype(np.uint8) * 255]), "RGBA")
    assert mask_box(alpha) == [30.0, 12.0, 81.0, 42.0]
    by_mask = model.caption(picture, masks=[mask, mask[::-1]])
    by_box = model.caption(picture, boxes=[mask_box(mask), mask_box(mask[::-1])])
    assert [r.caption for r in by_mask] == [r.caption for r in by_box] and [r.mask_id for r in by_mask] == [0, 1]
    with pytest.raises(ValueError, match="empty"):
        model.caption(picture, masks=[np.zeros((90, 120))])


def test_bad_input_says_what_is_wrong(export, picture):
    model = dynrefer.load(export)
    with pytest.raises(ValueError, match="either boxes or masks"):
        model.caption(picture)
    with pytest.raises(ValueError, match=r"region 0 .*box"):
        model.caption(picture, boxes=[[50, 50, 40, 60]])
    with pytest.raises(ValueError, match="not an image"):
        model.caption(b"hello", boxes=[[0, 0, 5, 5]])
    with pytest.raises(TypeError, match="PIL image"):
        model.caption(3, boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="no proposal model"):
        model.dense(picture)


def test_batches_over_images_and_from_a_config_name(export, picture):
    model = dynrefer.load(export)
    other = picture[::-1].copy()
    many = model.caption_images([(picture, [[1, 1, 30, 30]]), (other, []), (other, [[5, 5, 60, 60], [0, 0, 9, 9]])])
    assert [len(r) for r in many] == [1, 0, 2]
    assert many[2][0].caption == model.caption(other, boxes=[[5, 5, 60, 60]])[0].caption
    fresh = dynrefer.load("tiny")
    assert fresh.model.cfg.image_size == 64
