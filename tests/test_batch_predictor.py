"""DynReferPredictor in a user's own Ray Data pipeline on a real local Ray cluster: the captions the Python API
gives, an error row (not a failed job) for an unreadable image or a bad box."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dynrefer
from dynrefer.checkpoint import save_pretrained
from dynrefer.config import load_config
from dynrefer.model import DynRefer


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg.language.vocabulary = "a the red blue green small large striped circle square left of right".split()
    cfg.language.max_new_tokens = 4
    cfg.tags.vocabulary = ["red", "blue", "circle"]
    cfg.recognition.categories = ["circle", "square"]
    path = tmp_path_factory.mktemp("batch_predictor") / "export"
    save_pretrained(DynRefer(cfg), str(path))
    return str(path)


def test_map_batches_captions_as_the_python_api_and_keeps_bad_rows(export, tmp_path, ray_local):
    import ray

    from pipelines.batch_predictor import DynReferPredictor

    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(120, 90), (80, 100)]):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    boxes = {files[0]: [[10, 10, 50, 40], [60, 20, 110, 80]], files[1]: [[5, 5, 70, 90]]}
    rows = [{"image": f, "box": b} for f, bs in boxes.items() for b in bs]
    rows += [{"image": str(tmp_path / "missing.png"), "box": [1, 1, 5, 5]}, {"image": files[1], "box": [50, 50, 40, 60]}]
    ds = ray.data.from_items(rows).map_batches(DynReferPredictor, fn_constructor_kwargs={"model": export},
                                               batch_size=8, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    out = {(r["image"], tuple(r["box"])): r for r in ds.take_all()}
    assert len(out) == len(rows)
    api = dynrefer.load(export)
    for file, bs in boxes.items():
        for box, region in zip(bs, api.caption(Image.open(file), boxes=bs)):
            got = out[(file, tuple(box))]
            assert got["error"] is None and got["reason"] is None and got["caption"] == region.caption
            assert got["caption_score"] == pytest.approx(region.caption_score, rel=1e-4)
            assert list(got["tags"]) == [t for t, _ in region.tags] and got["category"] == region.category
            assert json.loads(got["category_scores"]) == pytest.approx(region.category_scores, rel=1e-4)
            assert list(got["view_ts"])[0] == 0.0 and len(got["view_ts"]) == 3
    missing = out[(str(tmp_path / "missing.png"), (1, 1, 5, 5))]
    assert "missing.png" in missing["error"] and missing["reason"] == "missing" and missing["caption"] == ""
    bad_box = out[(files[1], (50, 50, 40, 60))]
    assert bad_box["error"] and bad_box["reason"] == "bad_box" and bad_box["caption"] == ""
    assert np.isnan(bad_box["caption_score"])
