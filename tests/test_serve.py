"""The Serve app: request parsing and preprocessing as pure functions, then the real app over HTTP on 127.0.0.1,
then its web page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dynrefer.config import load_config
from dynrefer.proposal_filter import keep_proposals
from dynrefer.views import validate_box
from pipelines.serve import (
    PAGE, ChatCompletion, Dense, Limits, ModelList, Prepared, RegionOut, RegionsResponse, RequestError, bounded,
    chat_payload, completion, deployment_options, guarded, parse_config, parse_payload, predict_items,
    prepare_request, read_body, read_payload, region_results, stream_events,
)

LIMITS = Limits(max_body_bytes=300_000, max_pixels=250_000, max_boxes=4, max_texts=3, max_text_chars=40)
BOXES = [[20, 30, 120, 130], [150, 60, 290, 200]]


def payload(ctype: str, body: bytes, limits: Limits = LIMITS):
    """parse_payload on a whole body (the app feeds it the body's chunks as they arrive)."""
    return asyncio.run(parse_payload(ctype, body, limits))


def picture(width: int = 320, height: int = 240, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small image with a few coloured shapes on noise."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 60, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([20, 30, 120, 130], fill=(220, 40, 40))
    draw.ellipse([150, 60, 290, 200], fill=(40, 90, 230))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def flat(width: int, height: int) -> bytes:
    """A one-colour PNG: many pixels in few bytes."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(out, format="PNG")
    return out.getvalue()


def multipart(fields: dict[str, bytes | str], boundary: str = "dynrefer-test-boundary") -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data request; ``image`` goes as a file part."""
    out = b""
    for name, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        extra = '; filename="upload.png"\r\nContent-Type: image/png' if name == "image" else ""
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", out + f"--{boundary}--\r\n".encode()


# ----------------------------------------------------------------------------------------- pure functions


def test_config_is_checked_and_becomes_deployment_options():
    with pytest.raises(ValueError, match="unknown key"):
        parse_config({"model": "m", "batch": {}})
    with pytest.raises(ValueError, match="at least twice"):
        parse_config({"model": "m", "batching": {"max_batch_size": 8}, "predictor": {"max_ongoing_requests": 10}})
    cfg = parse_config({"model": "m", "batching": {"enabled": False, "max_batch_size": 8},
                        "predictor": {"max_ongoing_requests": 4, "num_gpus": 1,
                                      "autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    opts = deployment_options(cfg.predictor)
    assert opts["ray_actor_options"]["num_gpus"] == 1 and opts["max_ongoing_requests"] == 4
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "initial_replicas" not in opts["autoscaling_config"]


@pytest.mark.parametrize("name", ["local", "gpu"])
def test_shipped_serve_configs_build_the_app_bound_to_loopback(name):
    from ray.serve import Application

    from pipelines.serve import app_builder, read_serve_file

    spec = read_serve_file(os.path.join(os.path.dirname(__file__), "..", "configs", "serve", f"{name}.yaml"))
    assert spec["http_options"]["host"] == "127.0.0.1"
    for app in spec["applications"]:
        cfg = parse_config(app["args"])
        assert isinstance(app_builder(app["args"]), Application)
        assert cfg.predictor.max_ongoing_requests >= 2 * cfg.batching.max_batch_size
        assert (cfg.predictor.num_gpus >= 1) == (name == "gpu")


def test_payload_from_json_multipart_and_raw_bytes_agree():
    image = picture()
    boxes = [[10, 20, 100, 120], [150.5, 60, 290, 200]]
    as_json = payload("application/json", json.dumps(
        {"image": base64.b64encode(image).decode(), "boxes": boxes, "texts": ["red", "blue", "red"]}).encode())
    ctype, body = multipart({"image": image, "boxes": json.dumps(boxes), "texts": '["red", "blue"]'})
    as_form = payload(ctype, body)
    assert as_json == as_form and as_json.image == image and as_json.texts == ["red", "blue"]
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    assert payload("application/json; charset=utf-8", json.dumps({"image": data_url}).encode()).image == image
    raw = payload("image/png", image)
    assert raw.image == image and raw.boxes is None


@pytest.mark.parametrize("ctype,body,status,error", [
    ("text/plain", b"hi", 415, "unsupported_media_type"),
    ("application/json", b"{not json", 400, "bad_request"),
    ("application/json", b'{"image": "@@@"}', 422, "bad_image"),
    ("application/json", b'{"url": "http://example.com/a.jpg"}', 422, "url_not_fetched"),
    ("application/json", json.dumps({"image": "aGk=", "boxes": [[0, 0, 1, 1]] * 5}).encode(), 422,
     "too_many_boxes"),
    ("application/json", b'{"image": "aGk=", "boxes": [[0, 0, 1]]}', 422, "bad_box"),
    ("application/json", b'{"image": "aGk=", "boxes": [[0, 0, true, 1]]}', 422, "bad_box"),
    ("application/json", b'{"image": "aGk=", "texts": ["a", ""]}', 422, "bad_texts"),
    ("application/json", b'{"image": "aGk=", "texts": ["a", "b", "c", "d"]}', 422, "bad_texts"),
    ("application/json", b'{"image": "aGk=", "colour": 1}', 422, "bad_request"),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data; name=image\r\n\r\nab", 400,
     "bad_request"),
    ("multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="boxes"\r\n\r\n[]\r\n--xyz--',
     422, "bad_image"),
])
def test_payload_refusals_say_what_is_wrong(ctype, body, status, error):
    with pytest.raises(RequestError) as e:
        payload(ctype, body)
    assert (e.value.status, e.value.error) == (status, error) and e.value.message


DEEP = b"[" * 100_000 + b"]" * 100_000  # far past Python's recursion limit


def hostile_requests() -> list[tuple[str, str, bytes, int, str]]:
    """(what, Content-Type, body, status, error) of inputs that crashed the parser with a 500 once."""
    image = base64.b64encode(picture(32, 32)).decode()
    long_int = "1" + "0" * 400  # no float has it: OverflowError
    ctype, deep_form = multipart({"image": picture(32, 32), "boxes": DEEP.decode()})
    _, plain_form = multipart({"image": picture(32, 32), "boxes": "[[0, 0, 5, 5]]"}, boundary="abc")
    return [
        ("400-digit box coordinate", "application/json",
         f'{{"image": "{image}", "boxes": [[0, 0, {long_int}, 5]]}}'.encode(), 422, "bad_box"),
        ("5000-digit integer", "application/json",
         f'{{"image": "{image}", "boxes": [[0, 0, 1{"0" * 5000}, 5]]}}'.encode(), 400, "bad_request"),
        ("JSON body nested 100k deep", "application/json", DEEP, 400, "bad_request"),
        ("multipart boxes nested 100k deep", ctype, deep_form, 400, "bad_request"),
        ("RFC 2231 boundary", "multipart/form-data; boundary*=utf-8''abc", plain_form, 400, "bad_request"),
        ("infinite coordinate", "application/json", f'{{"image": "{image}", "boxes": [[0, 0, 1e999, 5]]}}'.encode(),
         422, "bad_box"),
        ("NaN coordinate", "application/json", f'{{"image": "{image}", "boxes": [[0, NaN, 5, 5]]}}'.encode(), 422,
         "bad_box"),
        ("boundary outside RFC 2046", "multipart/form-data; boundary=\"a\u00e9b\"", plain_form, 400, "bad_request"),
    ]


@pytest.mark.parametrize("what,ctype,body,status,error", hostile_requests(), ids=lambda v: v if isinstance(v, str)
                         and len(v) < 40 else "")
def test_hostile_numbers_nesting_and_boundaries_are_4xx_with_a_short_message(what, ctype, body, status, error):
    with pytest.raises(RequestError) as e:
        payload(ctype, body)
    assert (e.value.status, e.value.error) == (status, error), what
    assert 0 < len(e.value.message) < 300, e.value.message  # never the client's megabytes echoed back


def test_body_is_refused_by_its_declared_length_before_any_byte_is_read_and_by_its_size_otherwise():
    from starlette.requests import Request

    def request(headers: dict[str, str], chunks: list[bytes]):
        reads = []

        async def receive():
            reads.append(1)
            return {"type": "http.request", "body": chunks[len(reads) - 1], "more_body": len(reads) < len(chunks)}

        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        return Request(scope, receive), reads

    req, reads = request({"Content-Length": "5000"}, [b"x" * 5000])
    with pytest.raises(RequestError) as e:
        asyncio.run(read_body(req, 1000))
    assert e.value.status == 413 and not reads
    req, reads = request({}, [b"x" * 400] * 10)
    with pytest.raises(RequestError) as e:
        asyncio.run(read_body(req, 1000))
    assert e.value.status == 413 and len(reads) == 3
    req, _ = request({}, [b"ab", b"cd"])
    assert asyncio.run(read_body(req, 1000)) == b"abcd"
    # a multipart body without Content-Length stops at the limit inside Starlette's form parser too
    ctype, body = multipart({"image": picture(), "boxes": "[[0, 0, 5, 5]]"})
    req, reads = request({"Content-Type": ctype}, [body[i: i + 4096] for i in range(0, len(body), 4096)])
    with pytest.raises(RequestError) as e:
        asyncio.run(read_payload(req, Limits(max_body_bytes=20_000)))
    assert (e.value.status, e.value.error) == (413, "body_too_large") and len(reads) == 5
    req, _ = request({"Content-Type": ctype}, [body[i: i + 4096] for i in range(0, len(body), 4096)])
    assert asyncio.run(read_payload(req, LIMITS)).boxes == [[0.0, 0.0, 5.0, 5.0]]


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = load_config("tiny")
    cfg.tags.vocabulary = ["red", "blue", "circle", "striped"]
    cfg.tags.threshold = 0.0  # untrained: every tag comes back, with its score
    cfg.language.max_new_tokens = 6
    return cfg


def test_prepare_request_gives_the_batch_pipelines_views(tiny_cfg):
    from dynrefer.batching import build_inputs
    from dynrefer.imageio import decode_image
    from dynrefer.preprocess import PrepareConfig, preprocess_image

    image = picture()
    boxes = [[10, 20, 100, 120], [-5, 60, 290, 260]]  # the second is clipped to the image
    got = prepare_request(image, boxes, ["red"], tiny_cfg, "phash", LIMITS)
    assert got.failure is None and got.boxes[1] == [0.0, 60.0, 290.0, 240.0] and (got.width, got.height) == (320, 240)
    prep = PrepareConfig(view_size=tiny_cfg.image_size, candidate_ts=tiny_cfg.views.candidate_ts)
    record = {"image_id": "i", "file": "f", "regions": [{"region_id": str(i), "box": b} for i, b in enumerate(boxes)]}
    rows, errors = preprocess_image(record, image, prep)
    want = build_inputs(rows, {"f": decode_image(image)}, tiny_cfg.views, tiny_cfg.image_size, "phash",
                        prepared_size=tiny_cfg.image_size)
    assert not errors
    np.testing.assert_array_equal(got.inputs.views, want.views)
    np.testing.assert_array_equal(got.inputs.rois, want.rois)
    assert got.view_ts == want.ts.astype(float).round(6).tolist() and all(t[0] == 0.0 for t in got.view_ts)
    assert all(len(vb) == 3 and vb[-1][2] - vb[-1][0] >= vb[0][2] - vb[0][0] for vb in got.view_boxes)


def test_prepare_request_failures_carry_reasons_and_validate_box_messages(tiny_cfg):
    def fail(data, boxes, limits=LIMITS):
        f = prepare_request(data, boxes, [], tiny_cfg, "phash", limits).failure
        assert f is not None
        return f

    assert fail(b"not an image at all", [[0, 0, 5, 5]])["reason"] == "not_image"
    assert fail(picture()[:300], [[0, 0, 5, 5]])["reason"] in ("truncated", "corrupt")
    big = fail(flat(600, 500), [[0, 0, 5, 5]])
    assert (big["status"], big["reason"]) == (413, "too_large")
    outside = fail(picture(), [[0, 0, 5, 5], [400, 10, 500, 50]])
    with pytest.raises(ValueError) as e:
        validate_box([400, 10, 500, 50], 320, 240, name="boxes[1]")
    assert outside["status"] == 422 and outside["message"] == str(e.value)
    assert outside["details"] == [{"index": 1, "message": str(e.value)}]
    assert "zero or negative area" in fail(picture(), [[50, 50, 50, 80]])["message"]


def test_proposals_are_filtered_ranked_and_capped(tiny_cfg):
    proposed = [([0, 0, 10, 10], 0.2), ([5, 5, 60, 60], 0.9), ([10, 10, 100, 90], 0.5), ([1, 1, 30, 30], 0.6),
                ([0, 60, 1.5, 60], 0.95), ([319.5, 10, 320, 50], 0.97), ([10, 10, 10.4, 40], 0.96),
                ([-20, 230, 40, 260], 0.4)]
    assert keep_proposals(proposed, 320, 240, 0.3, 2) == [([5.0, 5.0, 60.0, 60.0], 0.9), ([1.0, 1.0, 30.0, 30.0], 0.6)]
    # every kept box is one validate_box accepts, clipped as it clips
    kept = keep_proposals(proposed, 320, 240, 0.3, 10)
    assert [b for b, _ in kept][-1] == [0.0, 230.0, 40.0, 240.0] and len(kept) == 4
    assert all(validate_box(b, 320, 240).tolist() == b for b, _ in kept)

    class FixedProposals:
        """Stands in for a detector: the same boxes for every image."""

        def propose(self, image):
            return proposed

    got = prepare_request(picture(), None, [], tiny_cfg, "fixed", LIMITS, FixedProposals(), Dense(min_score=0.3))
    assert got.source == "proposals" and got.scores == [0.9, 0.6, 0.5, 0.4] and got.inputs.view_index.shape == (4, 3)
    assert got.view_ts == [[0.0, 0.5, 1.0]] * 4 and got.boxes[-1] == [0.0, 230.0, 40.0, 240.0]


@pytest.fixture
def one_torch_thread():
    """One torch thread, as in a Ray replica (OMP_NUM_THREADS=1): threads fighting over 2 busy cores are 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_forward_for_many_requests_equals_one_per_request(tiny_cfg, one_torch_thread):
    import torch

    from dynrefer.model import DynRefer

    torch.manual_seed(3)
    model = DynRefer(tiny_cfg).eval()
    a = prepare_request(picture(seed=1), [[10, 20, 100, 120]], ["red"], tiny_cfg, "phash", LIMITS)
    b = prepare_request(picture(seed=2), [[150, 60, 290, 200], [0, 0, 64, 64]], ["blue", "circle"], tiny_cfg,
                        "phash", LIMITS)
    bad = Prepared(failure={"status": 422, "error": "bad_box", "message": "x"})
    together = predict_items(model, [a, bad, b], max_regions=2)
    alone = [predict_items(model, [x], max_regions=8)[0] for x in (a, b)]
    assert [len(p) for p in together] == [1, 0, 2]
    for got, want in zip([together[0], together[2]], alone):
        assert [p.caption for p in got] == [p.caption for p in want]
        assert [[t for t, _ in p.tags] for p in got] == [[t for t, _ in p.tags] for p in want]
        for g, w in zip(got, want):
            assert g.text_scores.keys() == w.text_scores.keys()
            np.testing.assert_allclose(list(g.text_scores.values()), list(w.text_scores.values()), rtol=1e-4, atol=1e-6)
    assert set(together[0][0].text_scores) == {"red"} and set(together[2][0].text_scores) == {"blue", "circle"}


def with_recognition(cfg, categories=("apple", "car", "dog"), attributes=("red", "blue", "round")):
    """A copy of ``cfg`` whose model names recognition labels (every attribute reported, untrained as it is)."""
    cfg = copy.deepcopy(cfg)
    cfg.recognition.categories, cfg.recognition.attributes = list(categories), list(attributes)
    cfg.recognition.attribute_threshold = 0.0
    return cfg


def test_category_and_attributes_reach_the_response_and_are_null_without_labels(tiny_cfg, one_torch_thread):
    import torch

    from dynrefer.model import DynRefer

    item = prepare_request(picture(seed=4), [[10, 20, 100, 120], [150, 60, 290, 200]], ["red"], tiny_cfg, "phash",
                           LIMITS)
    inputs = [torch.from_numpy(x) for x in (item.inputs.views, item.inputs.view_index, item.inputs.rois)]
    cfgs = {"both": with_recognition(tiny_cfg), "categories": with_recognition(tiny_cfg, attributes=()),
            "none": tiny_cfg}
    for name, cfg in cfgs.items():
        torch.manual_seed(5)
        model = DynRefer(cfg).eval()
        direct = model.predict(*inputs, texts=["red"])
        regions = [RegionOut.model_validate(r) for r in region_results(item, predict_items(model, [item], 8)[0],
                                                                        bool(cfg.recognition.attributes))]
        assert len(regions) == 2
        for got, want in zip(regions, direct):
            if name == "none":
                assert got.category is None and got.attributes is None and want.recognition is None
                continue
            rec = want.recognition
            best = max(rec.category_scores, key=rec.category_scores.get)
            assert got.category.name == best == rec.category and got.category.name in cfg.recognition.categories
            assert got.category.score == pytest.approx(rec.category_scores[best], rel=1e-4, abs=1e-6)
            if name == "categories":
                assert got.attributes is None
                continue
            by_score = sorted(rec.attribute_scores, key=lambda a: -rec.attribute_scores[a])
            assert [a.name for a in got.attributes] == by_score
            assert sorted(a.name for a in got.attributes) == sorted(cfg.recognition.attributes)
            for a in got.attributes:
                assert a.score == pytest.approx(rec.attribute_scores[a.name], rel=1e-4, abs=1e-6)
    as_json = region_results(item, predict_items(model, [item], 8)[0], False)[0]
    assert as_json["category"] is None and as_json["attributes"] is None


def test_server_errors_are_json_with_a_request_id_and_the_trace_only_in_the_log(caplog):
    async def broken(request_id):
        raise KeyError("/secret/path/model.safetensors")

    with caplog.at_level("ERROR", logger="dynrefer.serve"):
        response = asyncio.run(guarded(broken))
    body = json.loads(response.body)
    assert response.status_code == 500 and body["error"] == "internal"
    assert "secret" not in response.body.decode() and "Traceback" not in response.body.decode()
    assert body["request_id"] in caplog.text and "secret/path" in caplog.text


def test_a_slow_deployment_is_cancelled_upstream_too_and_answered_with_504():
    class Pending:
        """Awaitable like a DeploymentResponse that never resolves; remembers being cancelled."""

        cancelled = False

        def __await__(self):
            return asyncio.sleep(3600).__await__()

        def cancel(self):
            self.cancelled = True

    model, upstream = Pending(), Pending()
    with pytest.raises(RequestError) as e:
        asyncio.run(bounded(model, 0.05, "captioning", upstream=[upstream]))
    assert e.value.status == 504 and model.cancelled and upstream.cancelled


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def region_mask(box, width: int = 320, height: int = 240) -> np.ndarray:
    """A binary mask, an ellipse inside ``box``: its tight box is ``box``."""
    img = Image.new("L", (width, height), 0)
    x1, y1, x2, y2 = box
    ImageDraw.Draw(img).ellipse([x1, y1, x2 - 1, y2 - 1], fill=255)
    return np.asarray(img) > 0


def rgba(image: bytes, mask: np.ndarray) -> bytes:
    """The image with ``mask`` as its alpha channel (opaque inside), the OpenAI-style region prompt."""
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    return png(np.dstack([rgb, np.where(mask, 255, 0).astype(np.uint8)]))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_masks_reach_the_payload_from_json_and_multipart_and_points_are_refused():
    from dynrefer.masks import rle_encode

    image, mask = picture(), region_mask(BOXES[0])
    rle = rle_encode(mask)
    got = payload("application/json", json.dumps({"image": base64.b64encode(image).decode(), "masks": [rle]}).encode())
    assert got.masks == [rle] and got.boxes is None
    boundary = "mask-boundary"
    parts = [("image", "a.png", image), ("masks", "m0.png", png(mask)), ("masks", "m1.png", png(mask[::-1]))]
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="{f}"\r\n'
                    f'Content-Type: image/png\r\n\r\n'.encode() + d + b"\r\n" for n, f, d in parts)
    got = payload(f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode())
    assert got.image == image and got.masks == [png(mask), png(mask[::-1])] and got.boxes is None
    ctype, body = multipart({"image": image, "masks": json.dumps([rle])})
    assert payload(ctype, body).masks == [rle]
    b64 = base64.b64encode(image).decode()
    for ctype, body, status, error in [
        ("application/json", json.dumps({"image": b64, "points": [[10, 10]]}).encode(), 422, "points_not_supported"),
        (*multipart({"image": image, "points": "[[10, 10]]"}), 422, "points_not_supported"),
        ("application/json", json.dumps({"image": b64, "boxes": BOXES, "masks": [rle]}).encode(), 422,
         "bad_request"),
        ("application/json", json.dumps({"image": b64, "masks": {"size": [1, 1]}}).encode(), 422, "bad_mask"),
        ("application/json", json.dumps({"image": b64, "masks": [7]}).encode(), 422, "bad_mask"),
        ("application/json", json.dumps({"image": b64, "masks": [rle] * 5}).encode(), 422, "too_many_boxes"),
        ("multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nab\r\n'
                                              b'--xyz--\r\n', 422, "bad_image"),  # a text field, not a file
    ]:
        with pytest.raises(RequestError) as e:
            payload(ctype, body)
        assert (e.value.status, e.value.error) == (status, error), e.value.message
    with pytest.raises(RequestError) as e:
        payload("application/json", json.dumps({"image": b64, "points": [[1, 2]]}).encode())
    assert "send a box" in e.value.message and "mask" in e.value.message


def test_prepare_request_takes_masks_tight_boxes_and_the_alpha_channel(tiny_cfg):
    from dynrefer.masks import rle_encode

    image = picture()
    masks = [region_mask(b) for b in BOXES]
    by_box = prepare_request(image, BOXES, [], tiny_cfg, "phash", LIMITS)
    for given in ([png(m) for m in masks], [rle_encode(m) for m in masks],
                  [base64.b64encode(png(m)).decode() for m in masks]):
        got = prepare_request(image, None, [], tiny_cfg, "phash", LIMITS, masks=given)
        assert got.failure is None and got.source == "masks" and got.mask_ids == [0, 1]
        assert got.boxes == [[float(v) for v in b] for b in BOXES] and got.view_boxes == by_box.view_boxes
        np.testing.assert_array_equal(got.inputs.views, by_box.inputs.views)
    alpha = prepare_request(rgba(image, masks[1]), None, [], tiny_cfg, "phash", LIMITS, alpha=True)
    assert alpha.failure is None and alpha.source == "alpha" and alpha.boxes == [[150.0, 60.0, 290.0, 200.0]]
    np.testing.assert_array_equal(alpha.inputs.views[alpha.inputs.view_index[0]],
                                  by_box.inputs.views[by_box.inputs.view_index[1]])  # same pixels, alpha dropped
    for kw, error, words in [
        ({"masks": [png(region_mask(BOXES[0], 100, 80))]}, "bad_mask", "masks[0] is 100x80; the image is 320x240"),
        ({"masks": [png(np.zeros((240, 320), np.uint8))]}, "bad_mask", "empty"),
        ({"masks": [{"size": [240, 320], "counts": [5]}]}, "bad_mask", "add up to"),
        ({"alpha": True}, "no_region", "alpha channel"),  # an RGB image marks no region
    ]:
        f = prepare_request(image, None, [], tiny_cfg, "phash", LIMITS, **kw).failure
        assert f is not None and (f["status"], f["error"]) == (422, error) and words in f["message"], f


def chat_body(**kw):
    doc = {"model": "dynrefer", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe the region."},
        {"type": "image_url", "image_url": {"url": data_url(picture(32, 32))}}]}]}
    return {**doc, **kw}


def test_chat_requests_are_read_like_openai_sends_them_and_refused_with_reasons():
    got, stream = chat_payload(chat_body(stream=True, temperature=0.2), LIMITS, "dynrefer")
    assert got.image == picture(32, 32) and got.boxes is None and got.masks is None and stream
    got, stream = chat_payload(chat_body(boxes=[[0, 0, 5, 5]], texts=["red"]), LIMITS, "dynrefer")
    assert got.boxes == [[0.0, 0.0, 5.0, 5.0]] and got.texts == ["red"] and not stream
    two = chat_body()
    two["messages"][0]["content"].append(two["messages"][0]["content"][1])
    text_only = chat_body(messages=[{"role": "user", "content": "hello"}])
    remote = chat_body()
    remote["messages"][0]["content"][1]["image_url"]["url"] = "http://127.0.0.1:1/cat.png"
    for doc, status, error in [
        (chat_body(model="gpt-4o"), 404, "model_not_found"), (text_only, 422, "bad_image"), (two, 422, "bad_image"),
        (remote, 422, "url_not_fetched"), (chat_body(messages=[]), 422, "bad_request"),
        (chat_body(messages=[{"role": "wizard", "content": "x"}]), 422, "bad_request"),
        (chat_body(points=[[3, 3]]), 422, "points_not_supported"),
        (chat_body(boxes=[[0, 0, int("1" + "0" * 400), 5]]), 422, "bad_box"), ([1, 2], 400, "bad_request"),
    ]:
        with pytest.raises(RequestError) as e:
            chat_payload(doc, LIMITS, "dynrefer")
        assert (e.value.status, e.value.error) == (status, error) and len(e.value.message) < 300, e.value.message


def test_a_completion_streams_as_chunks_that_add_up_to_it():
    answer = {"request_id": "r1", "image": {"width": 2, "height": 2}, "source": "request", "batch": {},
              "regions": [{"caption": "a red  square"}, {"caption": ""}, {"caption": "blue"}]}
    done = completion(answer, "dynrefer", 123)
    assert [c["message"]["content"] for c in done["choices"]] == ["a red  square", "", "blue"]
    events = list(stream_events(done))
    assert events[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and {c["id"] for c in chunks} == {"chatcmpl-r1"}
    text = {}
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] = text.get(ch["index"], "") + ch["delta"].get("content", "")
    assert text == {0: "a red  square", 1: "", 2: "blue"} and chunks[-1]["dynrefer"] == answer


def test_page_is_self_contained():
    assert "<canvas" in PAGE and 'type="file"' in PAGE
    for needle in ("http://", "https://", 'src="//', "<link", "import "):
        assert needle not in PAGE


# ------------------------------------------------------------------------------------- the app over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_untrained_that_writes_words(cfg, path: str) -> None:
    """Export an untrained model whose captions of the page test's picture are not empty (most seeds write
    words; some write only EOS, and whether a seed does changes with any change to the initialisation)."""
    import torch
    from PIL import Image

    import dynrefer
    from dynrefer.checkpoint import save_pretrained
    from dynrefer.model import DynRefer

    for seed in range(20):
        torch.manual_seed(seed)
        save_pretrained(DynRefer(cfg), path)
        if all(r.caption for r in dynrefer.load(path).caption(Image.open(io.BytesIO(picture())), BOXES)):
            return
    raise AssertionError("no seed in 0..19 gives an untrained model that writes words")


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_local, tiny_cfg):
    """The app on a real local Serve at 127.0.0.1 with an exported untrained tiny model (with recognition labels);
    shut down afterwards."""
    import requests
    from ray import serve

    from pipelines.serve import app_builder

    root = tmp_path_factory.mktemp("serve")
    save_untrained_that_writes_words(with_recognition(tiny_cfg), str(root / "model"))
    one = {"min_replicas": 1, "max_replicas": 1}
    args = {"model": str(root / "model"), "limits": {**LIMITS.__dict__, "request_timeout_s": 120},
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.5},
            "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 32, "autoscaling": one},
            "preprocess": {"num_cpus": 0.25, "max_ongoing_requests": 8, "autoscaling": one},
            "predictor": {"num_cpus": 0.5, "max_ongoing_requests": 8, "autoscaling": one}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 150})
    try:
        serve.run(app_builder(args), name="dynrefer-test", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert requests.get(base + "/healthz", timeout=60).json() == {"status": "ok"}
        yield {"base": base, "root": root}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def dense_server(server, tiny_cfg):
    """A second app on the same Serve, at /dense, with an untrained proposal model from dynrefer.proposals (an
    untrained FCOS scores about 0.1: its classification prior is 0.01)."""
    import requests
    import torch
    from ray import serve

    from dynrefer.proposals import ProposalConfig, Proposer, build_proposer
    from pipelines.serve import app_builder

    cfg = ProposalConfig(min_size=128, max_size=256)
    torch.manual_seed(0)  # an untrained proposer's output depends on its draw: seed 0 proposes 57 boxes here
    Proposer(build_proposer(cfg), cfg).save(str(server["root"] / "proposals"))
    small = {"num_cpus": 0.2, "max_ongoing_requests": 8, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    args = {"model": str(server["root"] / "model"), "proposals": str(server["root"] / "proposals"),
            "dense": {"min_score": 0.05, "max_regions": 3}, "limits": {"max_boxes": 4},
            "batching": {"max_batch_size": 4}, "ingress": small, "preprocess": small, "predictor": small}
    serve.run(app_builder(args), name="dynrefer-dense", route_prefix="/dense")
    try:
        assert requests.get(server["base"] + "/dense/healthz", timeout=60).json() == {"status": "ok"}
        yield {**server, "base": server["base"] + "/dense"}
    finally:
        serve.delete("dynrefer-dense")


def post(server, path, **kw):
    import requests

    return requests.post(server["base"] + path, timeout=150, **kw)



@pytest.mark.slow
def test_regions_multipart_base64_and_raw_agree(server):
    image = picture()
    form = post(server, "/v1/regions", files={"image": ("a.png", image, "image/png")},
                data={"boxes": json.dumps(BOXES), "texts": json.dumps(["a red square", "a blue circle"])})
    assert form.status_code == 200, form.text
    body = RegionsResponse.model_validate(form.json())
    assert len(body.regions) == 2 and (body.image.width, body.image.height) == (320, 240)
    assert form.headers["X-Request-ID"] == body.request_id
    for region, box in zip(body.regions, BOXES):
        assert region.box == box and isinstance(region.caption, str)
        assert region.caption_score is None or 0.0 <= region.caption_score <= 1.0
        assert "caption_score" in form.json()["regions"][0]
        assert sorted(t.tag for t in region.tags) == ["blue", "circle", "red", "striped"]
        assert all(0 <= t.score <= 1 for t in region.tags)
        assert list(region.text_scores) == ["a red square", "a blue circle"]
        assert [v.t for v in region.views][0] == 0.0 and len(region.views) == 3
        assert region.category.name in ("apple", "car", "dog") and 0 <= region.category.score <= 1
        assert sorted(a.name for a in region.attributes) == ["blue", "red", "round"]
    as_json = post(server, "/v1/regions", json={"image": base64.b64encode(image).decode(), "boxes": BOXES},
                   headers={"X-Request-ID": "client-trace-7"})
    assert as_json.status_code == 200, as_json.text
    assert [r["caption"] for r in as_json.json()["regions"]] == [r.caption for r in body.regions]
    assert all(r["text_scores"] == {} for r in as_json.json()["regions"])
    assert as_json.json()["request_id"] == as_json.headers["X-Request-ID"] == "client-trace-7"
    dense = post(server, "/v1/dense", json={"image": base64.b64encode(image).decode(), "boxes": BOXES[:1]})
    assert dense.status_code == 200 and dense.json()["source"] == "request"
    assert [r["caption"] for r in dense.json()["regions"]] == [body.regions[0].caption]


@pytest.mark.slow
def test_dense_captions_the_proposals_of_the_configured_proposal_model(dense_server):
    r = post(dense_server, "/v1/dense", data=picture(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = RegionsResponse.model_validate(r.json())
    assert body.source == "proposals" and 1 <= len(body.regions) <= 3
    scores = [region.score for region in body.regions]
    assert all(s >= 0.05 for s in scores) and scores == sorted(scores, reverse=True)
    assert all(0 <= b.box[0] < b.box[2] <= 320 and 0 <= b.box[1] < b.box[3] <= 240 for b in body.regions)
    given = post(dense_server, "/v1/dense", files={"image": ("a.png", picture(), "image/png")},
                 data={"boxes": json.dumps(BOXES)})
    assert given.json()["source"] == "request" and [g["box"] for g in given.json()["regions"]] == BOXES


@pytest.mark.slow
def test_bad_requests_get_the_right_4xx_and_a_json_body(server):
    image = picture()
    b64 = base64.b64encode(image).decode()

    def form(data: bytes, boxes=BOXES):
        return {"files": {"image": ("x.png", data, "image/png")}, "data": {"boxes": json.dumps(boxes)}}

    outside = [[400, 10, 500, 50]]
    with pytest.raises(ValueError) as outside_msg:
        validate_box(outside[0], 320, 240, name="boxes[0]")
    cases = [
        ("/v1/regions", form(b"GIF? no, plain text"), 422, "bad_image", "not_image"),
        ("/v1/regions", form(image[: len(image) // 2]), 422, "bad_image", None),
        ("/v1/regions", form(flat(600, 500)), 413, "bad_image", "too_large"),
        ("/v1/regions", form(image, BOXES * 3), 422, "too_many_boxes", None),
        ("/v1/regions", form(image, outside), 422, "bad_box", None),
        ("/v1/regions", form(image, [[50, 50, 40, 80]]), 422, "bad_box", None),
        ("/v1/regions", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type",
         None),
        ("/v1/regions", {"data": b"\xff" * 400_000, "headers": {"Content-Type": "image/jpeg"}}, 413, "body_too_large",
         None),
        ("/v1/regions", {"data": (b"\xff" * 20_000 for _ in range(20)), "headers": {"Content-Type": "image/jpeg"}},
         413, "body_too_large", None),
        ("/v1/regions", {"json": {"image": b64}}, 422, "bad_box", None),
        ("/v1/regions", {"json": {"url": "http://127.0.0.1:1/x.jpg"}}, 422, "url_not_fetched", None),
        ("/v1/dense", {"json": {"image": b64}}, 501, "no_proposals", None),
    ]
    for path, kw, status, error, reason in cases:
        r = post(server, path, **kw)
        body = r.json()
        assert (r.status_code, body["error"]) == (status, error), (path, status, r.text)
        assert body["message"] and body["request_id"] == r.headers["X-Request-ID"] and "Traceback" not in r.text
        if reason:
            assert body["reason"] == reason
    r = post(server, "/v1/regions", **form(image, outside))
    assert r.json()["message"] == str(outside_msg.value)
    assert post(server, "/v1/regions", **form(image, [[50, 50, 40, 80]])).json()["message"].startswith(
        "boxes[0] [50.0, 50.0, 40.0, 80.0]: zero or negative area")


@pytest.mark.slow
def test_hostile_inputs_unknown_routes_and_odd_request_ids_get_json_from_the_app(server):
    """Every input that once gave a 500 is a JSON 4xx over HTTP; FastAPI's own 404/405 have the same JSON body;
    a request id that is no sane token (8 KB of markup) is replaced by a fresh one in the body."""
    import requests

    for what, ctype, body, status, error in hostile_requests():
        r = post(server, "/v1/regions", data=body, headers={"Content-Type": ctype})
        assert r.headers["Content-Type"] == "application/json", (what, r.text[:200])
        assert (r.status_code, r.json()["error"]) == (status, error), (what, r.text[:300])
        assert len(r.content) < 600 and r.json()["request_id"]
    for method, path, status, error in [("GET", "/nowhere", 404, "not_found"), ("GET", "/v1/regions", 405,
                                         "method_not_allowed"), ("DELETE", "/healthz", 405, "method_not_allowed")]:
        r = requests.request(method, server["base"] + path, timeout=60, headers={"X-Request-ID": "trace-404"})
        assert r.status_code == status and r.headers["Content-Type"] == "application/json", r.text
        assert r.json()["error"] == error and r.json()["request_id"] == "trace-404" and r.json()["message"]
    markup = "<script>alert(1)</script>" + "x" * 8000
    image = base64.b64encode(picture()).decode()
    for bad_id in (markup, "a b", "-leading-dash", "x" * 129):
        r = post(server, "/v1/regions", json={"image": image, "boxes": BOXES[:1]}, headers={"X-Request-ID": bad_id})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["request_id"] != bad_id and len(r.json()["request_id"]) == 32 and "<" not in r.text
        refused = post(server, "/v1/regions", json={"image": image}, headers={"X-Request-ID": bad_id})
        assert refused.status_code == 422 and refused.json()["request_id"] != bad_id and "<script" not in refused.text
    kept = "3f2a9c1e-0b7d-4e5f-9a8b-1c2d3e4f5a6b"
    assert post(server, "/v1/regions", json={"image": image}, headers={"X-Request-ID": kept}).json()["request_id"] \
        == kept


@pytest.mark.slow
def test_dense_on_tiny_images_keeps_only_proposals_the_views_accept(dense_server):
    """On an 8x8 or 1x1 image the detector proposes boxes under a pixel wide; those are no regions, not a 422 about
    boxes the client never sent."""
    for size in (8, 1):
        r = post(dense_server, "/v1/dense", data=flat(size, size), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, (size, r.text[:400])
        body = RegionsResponse.model_validate(r.json())
        assert body.source == "proposals" and (body.image.width, body.image.height) == (size, size)
        for region in body.regions:
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 and x2 <= size and x2 - x1 >= 1 and 0 <= y1 and y2 <= size and y2 - y1 >= 1


@pytest.mark.slow
def test_health_model_info_and_docs(server):
    import requests

    base = server["base"]
    assert requests.get(base + "/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(base + "/v1/model", timeout=30).json()
    assert info["parameters"]["total"] > info["parameters"]["trainable"] > 0 and info["parameters"]["encoder"] > 0
    assert info["views"]["num_views"] == 3 and info["views"]["selection"] == "phash"
    assert info["config"]["tags"]["vocabulary_size"] == 4 and info["batching"]["max_batch_size"] == 4
    assert info["limits"]["max_boxes"] == 4 and info["proposals"] is None
    docs = requests.get(base + "/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(base + "/openapi.json", timeout=30).json()
    assert {"/v1/regions", "/v1/dense", "/healthz", "/v1/model", "/v1/chat/completions", "/v1/models"} <= set(
        spec["paths"])
    content = spec["paths"]["/v1/regions"]["post"]["requestBody"]["content"]
    assert {"image", "boxes", "masks", "texts"} <= set(content["multipart/form-data"]["schema"]["properties"])
    assert {"image", "boxes", "masks", "texts"} <= set(content["application/json"]["schema"]["properties"])
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"model", "messages", "stream", "boxes", "masks"} <= set(
        chat["requestBody"]["content"]["application/json"]["schema"]["properties"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "$ref" not in json.dumps(chat["requestBody"]) and "$ref" not in json.dumps(content)
    page = requests.get(base + "/", timeout=30)
    assert page.status_code == 200 and page.text == PAGE


@pytest.mark.slow
def test_parallel_requests_share_a_forward(server):
    import requests

    image = picture(seed=5)
    b64 = base64.b64encode(image).decode()

    def one(i):
        return post(server, "/v1/regions", json={"image": b64, "boxes": [[10 + i, 10, 120 + i, 150]]})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    shared = [r.json()["batch"]["requests"] for r in responses]
    assert max(shared) > 1 and all(1 <= s <= 4 for s in shared)
    stats = requests.get(server["base"] + "/v1/model", timeout=30).json()["batching"]
    assert stats["max_requests_per_forward"] > 1 and stats["forwards"] < stats["requests"]


@pytest.mark.slow
def test_regions_and_dense_take_masks_over_http_and_refuse_points(server):
    """Masks as PNG file parts (requests' multipart), as COCO RLE in JSON, and in /v1/dense: each mask's tight box
    is captioned as that box is, with the mask's index echoed; points are a 422 that says what to send."""
    from dynrefer.masks import rle_encode

    from pycocotools import mask as coco

    image = picture()
    masks = [region_mask(b) for b in BOXES]
    by_box = post(server, "/v1/regions", files={"image": ("a.png", image, "image/png")},
                  data={"boxes": json.dumps(BOXES)}).json()
    files = [("image", ("a.png", image, "image/png"))] + [("masks", (f"m{i}.png", png(m), "image/png"))
                                                          for i, m in enumerate(masks)]
    form = post(server, "/v1/regions", files=files)
    assert form.status_code == 200, form.text
    body = RegionsResponse.model_validate(form.json())
    assert body.source == "masks" and [r.mask_id for r in body.regions] == [0, 1]
    assert [r.box for r in body.regions] == BOXES
    assert [r.caption for r in body.regions] == [r["caption"] for r in by_box["regions"]]
    assert [r.views for r in body.regions] == [RegionOut.model_validate(r).views for r in by_box["regions"]]
    compressed = [{"size": [240, 320], "counts": coco.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()}
                  for m in masks]
    for rles in (compressed, [rle_encode(m) for m in masks]):
        as_json = post(server, "/v1/regions", json={"image": base64.b64encode(image).decode(), "masks": rles[::-1]})
        assert as_json.status_code == 200, as_json.text
        assert [r["box"] for r in as_json.json()["regions"]] == BOXES[::-1]
        assert [r["mask_id"] for r in as_json.json()["regions"]] == [0, 1]
    dense = post(server, "/v1/dense", files=files[:2])
    assert dense.status_code == 200 and dense.json()["source"] == "masks"
    assert [r["box"] for r in dense.json()["regions"]] == BOXES[:1]
    for kw, status, error in [
        ({"json": {"image": base64.b64encode(image).decode(), "points": [[60, 80]]}}, 422, "points_not_supported"),
        ({"files": files[:1], "data": {"points": "[[60, 80]]"}}, 422, "points_not_supported"),
        ({"files": [files[0], ("masks", ("m.png", png(region_mask([0, 0, 9, 9], 50, 40)), "image/png"))]}, 422,
         "bad_mask"),
        ({"json": {"image": base64.b64encode(image).decode(), "masks": [{"size": [240, 320], "counts": [3]}]}}, 422,
         "bad_mask"),
    ]:
        r = post(server, "/v1/regions", **kw)
        assert (r.status_code, r.json()["error"]) == (status, error), r.text
        assert r.json()["request_id"] == r.headers["X-Request-ID"]


@pytest.mark.slow
def test_openai_client_chat_completions_streaming_and_models(server):
    """The official openai package against /v1: the region as the image's alpha channel (or boxes in an
    extension field), the caption as the message, the same captions as /v1/regions (same preprocessing and model),
    streaming as server-sent events, /v1/models, and OpenAI-style errors the client raises."""
    import openai
    import requests

    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=150, max_retries=0)
    assert [m.id for m in client.models.list()] == ["dynrefer"]
    assert client.models.retrieve("dynrefer").id == "dynrefer"
    image = picture()
    want = post(server, "/v1/regions", json={"image": base64.b64encode(image).decode(), "boxes": BOXES}).json()
    marked = rgba(image, region_mask(BOXES[1]))

    def messages(url: str):
        return [{"role": "system", "content": "You describe regions."},
                {"role": "user", "content": [{"type": "text", "text": "Describe the marked region."},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    done = client.chat.completions.create(model="dynrefer", messages=messages(data_url(marked)))
    assert done.object == "chat.completion" and done.model == "dynrefer" and len(done.choices) == 1
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.content == want["regions"][1]["caption"]
    extension = RegionsResponse.model_validate(done.model_extra["dynrefer"])
    assert extension.source == "alpha" and extension.regions[0].box == BOXES[1]
    assert extension.regions[0].category is not None and extension.regions[0].tags
    ChatCompletion.model_validate(done.model_dump())
    both = client.chat.completions.create(model="dynrefer", messages=messages(data_url(image)),
                                          extra_body={"boxes": BOXES, "texts": ["a red square"]})
    assert [c.message.content for c in both.choices] == [r["caption"] for r in want["regions"]]
    assert [c.index for c in both.choices] == [0, 1]
    assert list(both.model_extra["dynrefer"]["regions"][0]["text_scores"]) == ["a red square"]

    stream = client.chat.completions.create(model="dynrefer", messages=messages(data_url(marked)), stream=True)
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == done.choices[0].message.content and finish == "stop"
    raw = requests.post(server["base"] + "/v1/chat/completions", timeout=150, stream=True,
                        json={"model": "dynrefer", "messages": messages(data_url(marked)), "stream": True})
    assert raw.status_code == 200 and raw.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=messages(data_url(marked)))
    # the app's one error body on every route: the client raises by status and keeps the body
    assert e.value.response.json()["error"] == "model_not_found" and "dynrefer" in e.value.response.json()["message"]
    for url, error in [("https://example.com/cat.png", "url_not_fetched"), (data_url(image), "no_region")]:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(model="dynrefer", messages=messages(url))
        body = e.value.response.json()
        assert body["error"] == error and body["request_id"] == e.value.response.headers["X-Request-ID"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="dynrefer", messages=messages(data_url(image)),
                                       extra_body={"points": [[60, 80]]})
    assert e.value.response.json()["error"] == "points_not_supported"
    big = post(server, "/v1/chat/completions", data=b"{" + b" " * 400_000 + b"}",
               headers={"Content-Type": "application/json"})
    assert (big.status_code, big.json()["error"]) == (413, "body_too_large")
    assert post(server, "/v1/chat/completions", data=b"x", headers={"Content-Type": "text/plain"}).status_code == 415


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    d = app.deployments.get(deployment) if app else None

    def value(s) -> str:  # an enum or its name, by Ray version
        return str(getattr(s, "value", s))

    return 0 if d is None or value(d.status) != "HEALTHY" else sum(
        n for state, n in d.replica_states.items() if value(state) == "RUNNING")


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")


@pytest.mark.slow
def test_a_killed_model_replica_is_replaced_under_load_and_no_request_hangs(server, tiny_cfg):
    """SIGKILL one of two model replicas while clients keep sending: few requests fail (each with a JSON 503 and
    Retry-After), none outlives its client timeout, Serve starts a new replica (new process), and it serves again."""
    import requests
    import torch
    from ray import serve

    from dynrefer.checkpoint import save_pretrained
    from dynrefer.model import DynRefer
    from pipelines.serve import app_builder, replica_processes

    torch.manual_seed(3)
    save_pretrained(DynRefer(tiny_cfg), str(server["root"] / "plain-model"))  # no recognition labels
    name, clients, client_timeout = "dynrefer-kill", 6, 90.0
    small = {"num_cpus": 0.05, "max_ongoing_requests": 8, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    args = {"model": str(server["root"] / "plain-model"), "limits": {"request_timeout_s": 60},
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
            "ingress": {**small, "max_ongoing_requests": 32}, "preprocess": small,
            "predictor": {**small, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}}
    serve.run(app_builder(args), name=name, route_prefix="/kill")
    url = server["base"] + "/kill/v1/regions"
    body = {"image": base64.b64encode(picture(seed=7)).decode(), "boxes": BOXES}
    results: list[tuple[float, float, int, dict]] = []  # (start, end, status or 0 for a client-side error, body)
    lock, stop = threading.Lock(), threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                r = requests.post(url, json=body, timeout=client_timeout)
                status, answer = r.status_code, r.json()
            except requests.RequestException as e:
                status, answer = 0, {"error": repr(e)}
            with lock:
                results.append((start, time.monotonic(), status, answer))

    def replacement(victim: str) -> dict[str, int] | None:
        now = replica_processes(name, "Predictor")
        return now if len(now) == 2 and victim not in now and running_replicas(name, "Predictor") == 2 else None

    def served_by() -> set[str]:
        with lock:
            return {a["batch"]["replica"] for _, _, st, a in results if st == 200}

    try:
        before = replica_processes(name, "Predictor")
        assert len(before) == 2 and running_replicas(name, "Predictor") == 2
        with ThreadPoolExecutor(clients) as pool:
            workers = [pool.submit(client) for _ in range(clients)]
            try:
                victim = wait_until(lambda: next(iter(served_by() & set(before)), None), 120, "first answers")
                wait_until(lambda: len(results) >= 3 * clients, 120, "steady load")
                os.kill(before[victim], signal.SIGKILL)
                killed_at = time.monotonic()
                replaced = wait_until(lambda: replacement(victim), 180, "a replacement replica")
                recovered_at = time.monotonic()
                with lock:
                    done_at_recovery = len(results)
                wait_until(lambda: sum(st == 200 for _, _, st, _ in results[done_at_recovery:]) >= 2 * clients, 120,
                           "answers after recovery")
            finally:
                stop.set()
                for w in workers:
                    w.result(timeout=client_timeout + 30)
        (new,) = set(replaced) - set(before)
        assert replaced[new] not in before.values() and set(replaced) - {new} == set(before) - {victim}
        failed = [(start, end, st, a) for start, end, st, a in results if st != 200]
        print(f"killed replica {victim} (pid {before[victim]}); replaced by {new} (pid {replaced[new]}) in "
              f"{recovered_at - killed_at:.1f} s; failed {len(failed)}/{len(results)}")
        assert all(end - start < client_timeout for start, end, _, _ in results)  # none hung
        assert all(st == 503 and a["error"] == "replica_lost" and a["request_id"] for _, _, st, a in failed), failed
        # Only requests under way when the replica died may fail: at most one per client, each started before
        # the kill (the router drops a dead replica from its choices on the first failure).
        assert len(failed) <= clients and all(start <= killed_at for start, _, _, _ in failed), failed
        after = [a for start, _, st, a in results if start > recovered_at]
        assert after and all(st == 200 for start, _, st, _ in results if start > recovered_at)
        assert all(r["category"] is None and r["attributes"] is None for a in after for r in a["regions"])
        # The replacement serves: new requests reach it.
        answers = [requests.post(url, json=body, timeout=client_timeout) for _ in range(30)]
        assert all(r.status_code == 200 for r in answers)
        assert new in {r.json()["batch"]["replica"] for r in answers}
    finally:
        serve.delete(name)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_serve_deploy_of_the_shipped_config_on_a_ray_start_cluster(tmp_path, tiny_cfg):
    """`ray start --head` on 127.0.0.1, `serve deploy configs/serve/local.yaml` (model and port changed), answers,
    then `serve shutdown` and the cluster's processes stopped: ours only, not by name as `ray stop` would (other
    Ray clusters may share the machine)."""
    import psutil
    import requests
    import torch
    import yaml

    from dynrefer.checkpoint import save_pretrained
    from dynrefer.model import DynRefer

    torch.manual_seed(3)
    save_pretrained(DynRefer(tiny_cfg), str(tmp_path / "export"))
    with open(os.path.join(REPO, "configs", "serve", "local.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["http_options"]["port"] = http_port = free_port()
    spec["applications"][0]["args"].update(model=str(tmp_path / "export"), proposals=None)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(spec))
    dashboard = f"http://127.0.0.1:{free_port()}"
    bin_dir = os.path.dirname(sys.executable)  # the venv's ray and serve
    # Auth off for this one cluster (its own temp dir and ports on 127.0.0.1, stopped by the test): under token auth
    # the test's unauthenticated readiness probe of the dashboard (/api/version) never answered 200 within 120 s;
    # tests/test_auth.py covers `ray job submit` and `serve status` with the token.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Its own temp dir (short: Unix socket paths under it must stay < 108 bytes): `ray start` records its address
    # there, which every later ray.init() on the machine would otherwise try to join.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", "0",
         "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", dashboard.rsplit(":", 1)[1], "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster: list = []

    def serve_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(bin_dir, "serve"), *args, "-a", dashboard], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    def answers(url: str):
        try:
            return requests.get(url, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(lambda: answers(dashboard + "/api/version"), 120, "the Ray dashboard", every_s=0.5)
        cluster[:] = psutil.Process(head.pid).children(recursive=True)
        deployed = serve_cli("deploy", str(tmp_path / "serve.yaml"))
        assert deployed.returncode == 0, deployed.stderr
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: answers(base + "/healthz"), 180, "the deployed app", every_s=1)
        r = requests.post(base + "/v1/regions", files={"image": ("a.png", picture(), "image/png")},
                          data={"boxes": json.dumps(BOXES)}, timeout=120)
        assert r.status_code == 200, r.text
        assert [g["box"] for g in r.json()["regions"]] == BOXES
        status = yaml.safe_load(serve_cli("status").stdout)
        assert status["applications"]["dynrefer"]["status"] == "RUNNING"
        assert set(status["applications"]["dynrefer"]["deployments"]) == {"Ingress", "Preprocess", "Predictor"}
    finally:
        try:
            assert serve_cli("shutdown", "-y").returncode == 0
        finally:
            if head.poll() is None:
                cluster += psutil.Process(head.pid).children(recursive=True)
            head.terminate()  # --block: drains the node and stops the processes it started
            try:
                head.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
            _, alive = psutil.wait_procs(cluster, timeout=30)
            for p in alive:
                p.kill()
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert not alive, alive


# ------------------------------------------------------------------------------------- the page in Chromium

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page, flat sessions)."""

    def __init__(self, profile: str):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1400,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and len(open(port_file).read().split()) >= 2):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.2)
        port, path = open(port_file).read().split()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def page(self, method: str, **params):
        return self.call(method, self.session, **params)

    def js(self, expression: str):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)

    def drag(self, x1: float, y1: float, x2: float, y2: float) -> None:
        self.page("Input.dispatchMouseEvent", type="mousePressed", x=x1, y=y1, button="left", buttons=1, clickCount=1)
        for f in (0.3, 0.7, 1.0):
            self.page("Input.dispatchMouseEvent", type="mouseMoved", x=x1 + f * (x2 - x1), y=y1 + f * (y2 - y1),
                      button="left", buttons=1)
        self.page("Input.dispatchMouseEvent", type="mouseReleased", x=x2, y=y2, button="left", buttons=0, clickCount=1)

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_uploads_an_image_draws_boxes_and_shows_captions(server, tmp_path):
    image_path = tmp_path / "upload.png"
    image_path.write_bytes(picture())
    browser = Browser(str(tmp_path / "profile"))
    try:
        browser.page("Page.enable")
        browser.page("Page.navigate", url=server["base"] + "/")
        browser.wait_for("document.readyState === 'complete' && !!window.dynrefer", 60)
        node = browser.page("DOM.querySelector", nodeId=browser.page("DOM.getDocument")["root"]["nodeId"],
                            selector="#file")["nodeId"]
        browser.page("DOM.setFileInputFiles", files=[str(image_path)], nodeId=node)
        browser.wait_for("window.dynrefer.imageLoaded", 30)
        rect = browser.js("(() => { const r = document.querySelector('#canvas').getBoundingClientRect();"
                          " return [r.left, r.top, r.width / 320]; })()")
        left, top, s = rect
        for x1, y1, x2, y2 in BOXES:
            browser.drag(left + x1 * s, top + y1 * s, left + x2 * s, top + y2 * s)
        drawn = browser.js("window.dynrefer.boxes")
        assert len(drawn) == 2 and all(abs(a - b) <= 2 for d, w in zip(drawn, BOXES) for a, b in zip(d, w))
        browser.js("document.querySelector('#caption').click()")
        state = browser.wait_for("['done', 'error'].includes(document.querySelector('#status').dataset.state) && "
                                 "document.querySelector('#status').dataset.state", 150)
        assert state == "done", browser.js("document.querySelector('#status').textContent")
        shown = browser.js("[...document.querySelectorAll('#results li .caption')].map(e => e.textContent)")
        recognition = browser.js("[...document.querySelectorAll('#results li .recognition')]"
                                 ".map(e => e.textContent)")
        shot = tmp_path / "serve-page.png"
        shot.write_bytes(base64.b64decode(browser.page("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
    api = post(server, "/v1/regions", json={"image": base64.b64encode(picture()).decode(), "boxes": drawn}).json()
    assert shown == [r["caption"] or "(no caption)" for r in api["regions"]] and len(shown) == 2
    assert len(recognition) == 2
    for text, region in zip(recognition, api["regions"]):
        assert text.startswith(f" [{region['category']['name']} ") and "attributes: " in text
        assert all(a["name"] in text for a in region["attributes"])
    assert any(r["caption"] for r in api["regions"])
    with Image.open(shot) as img:
        assert img.size[0] >= 640 and len(set(img.convert("RGB").getdata())) > 50
    print(f"screenshot: {shot}")
