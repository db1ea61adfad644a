"""The Serve app under stress: bounded queues that shed a burst with fast 503s, a lost replica answered with 503
and seen by /healthz, large images decoded reduced, and slow uploads cut off by the app's own timeout.

Pure functions first, then one small app on a real local Serve at 127.0.0.1 (two model replicas) for the
end-to-end checks; the replica-kill test runs last, as it replaces a replica of that app.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dynrefer.config import load_config
from pipelines.serve import Limits, RequestError, bounded, deployment_options, guarded, parse_config, prepare_request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def picture(width: int = 320, height: int = 240, seed: int = 0, fmt: str = "PNG") -> bytes:
    """Smooth colour fields with a few sharp-edged shapes."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
                          ).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 16, height // 8, width // 3, height // 2], fill=(220, 40, 40))
    draw.ellipse([width // 2, height // 4, width - width // 10, height - height // 6], fill=(40, 90, 230))
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


# ----------------------------------------------------------------------------------------- pure functions


def test_every_deployment_gets_a_bounded_queue_a_retry_after_and_a_short_health_check():
    cfg = parse_config({"model": "m", "preprocess": {"memory_mb": 1500, "max_queued_requests": 3}})
    opts = deployment_options(cfg.preprocess, retry_after_s=2.5)
    assert opts["max_queued_requests"] == 3 and opts["ray_actor_options"]["memory"] == 1500 * 1024 * 1024
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 2.5}
    assert opts["health_check_period_s"] == 2.0 and "memory" not in deployment_options(cfg.predictor)[
        "ray_actor_options"]
    with pytest.raises(ValueError, match="max_queued_requests"):
        parse_config({"model": "m", "ingress": {"max_queued_requests": -1}})
    with pytest.raises(ValueError, match="body_timeout_s"):
        parse_config({"model": "m", "limits": {"body_timeout_s": 0}})


@pytest.mark.parametrize("name", ["local", "gpu"])
def test_shipped_configs_run_two_model_replicas_with_bounded_queues(name):
    from pipelines.serve import read_serve_file

    (app,) = read_serve_file(os.path.join(REPO, "configs", "serve", f"{name}.yaml"))["applications"]
    cfg = parse_config(app["args"])
    assert cfg.predictor.autoscaling.min_replicas >= 2
    for d in (cfg.ingress, cfg.preprocess, cfg.predictor):
        assert 0 < d.max_queued_requests <= 4 * d.max_ongoing_requests and d.health_check_period_s <= 5
    assert cfg.preprocess.memory_mb and cfg.limits.body_timeout_s < cfg.limits.request_timeout_s
    if name == "local":  # at most every replica on 2 logical CPUs
        assert sum(d.num_cpus * d.autoscaling.max_replicas for d in (cfg.ingress, cfg.preprocess, cfg.predictor)) <= 2


class Failing:
    """Stands in for a DeploymentResponse whose await raises ``exc``; records cancellation, which raises ``exc``
    too, as Serve's does for a request its full queue refused."""

    def __init__(self, exc: BaseException):
        self.exc, self.cancelled = exc, False

    def __await__(self):
        raise self.exc
        yield  # pragma: no cover - makes this a generator

    def cancel(self) -> None:
        self.cancelled = True
        raise self.exc


def serve_failures():
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    return [(BackPressureError(num_queued_requests=4, max_queued_requests=4), "overloaded"),
            (ActorDiedError(), "replica_lost"), (ActorUnavailableError("unreachable", None), "replica_lost")]


@pytest.mark.parametrize("exc,error", serve_failures(), ids=["full queue", "actor died", "actor unavailable"])
def test_a_full_queue_or_a_lost_replica_is_a_json_503_with_retry_after(exc, error):
    import json

    upstream = Failing(exc)  # preprocessing, refused by its own full queue

    async def work(request_id: str):
        return await bounded(Failing(exc), 5.0, "captioning", upstream=[upstream], retry_after_s=1.5)

    response = asyncio.run(guarded(work, "rid-1"))
    body = json.loads(response.body)
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert body["error"] == error and body["request_id"] == "rid-1" and body["message"].startswith("captioning")
    assert upstream.cancelled


def test_a_bug_is_still_a_500_without_retry_after():
    async def work(request_id: str):
        return await bounded(Failing(KeyError("bug")), 5.0, "captioning")

    response = asyncio.run(guarded(work, "rid-2"))
    assert response.status_code == 500 and "retry-after" not in response.headers


def test_a_trickling_body_is_cut_off_with_a_408_by_the_body_timeout_and_by_the_request_deadline():
    from starlette.requests import Request

    from pipelines.serve.requests import read_payload, within

    def trickling() -> Request:
        async def receive():
            await asyncio.sleep(0.2)
            return {"type": "http.request", "body": b"{", "more_body": True}

        return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                        "headers": [(b"content-type", b"application/json")]}, receive)

    limits = Limits(body_timeout_s=0.5)
    for left_s, within_s in ((60.0, 0.5), (0.3, 0.3)):  # the body timeout, then the request's deadline first
        start = time.monotonic()
        deadline = start + left_s
        with pytest.raises(RequestError) as e:
            asyncio.run(within(read_payload(trickling(), limits), limits, deadline))
        assert (e.value.status, e.value.error) == (408, "body_timeout")
        assert within_s - 0.05 < time.monotonic() - start < within_s + 0.5


def test_the_pixel_budget_bounds_decodes_in_flight_and_always_admits_one():
    from pipelines.serve.memory import PixelBudget

    budget, lock = PixelBudget(100), threading.Lock()
    peak, now = [0], [0]

    def work(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                now[0] += pixels
                peak[0] = max(peak[0], now[0])
            time.sleep(0.05)
            with lock:
                now[0] -= pixels

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, [40] * 8 + [250]))  # 250: over the budget alone, admitted when nothing else runs
    assert peak[0] == 250 or peak[0] <= 100
    assert budget.in_flight == 0 and budget.running == 0


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = load_config("tiny")
    cfg.tags.vocabulary = ["red", "blue"]
    cfg.language.max_new_tokens = 4
    return cfg


def test_large_images_are_decoded_reduced_with_boxes_and_views_in_original_pixels(tiny_cfg, monkeypatch):
    from dynrefer import imageio
    from dynrefer.batching import build_inputs
    from dynrefer.imageio import decode_image
    from dynrefer.preprocess import PrepareConfig, preprocess_image

    image = picture(1600, 1200, fmt="JPEG")
    boxes = [[80, 120, 600, 760], [900, 100, 1570, 1300]]  # the second is clipped to the image
    decoded = []
    real = imageio.decode_reduced
    monkeypatch.setattr(imageio, "decode_reduced", lambda *a, **k: decoded.append(real(*a, **k)) or decoded[-1])
    got = prepare_request(image, boxes, [], tiny_cfg, "fixed", Limits(max_pixels=40_000_000))
    assert got.failure is None and (got.width, got.height) == (1600, 1200)
    assert got.boxes == [[80.0, 120.0, 600.0, 760.0], [900.0, 100.0, 1570.0, 1200.0]]
    (reduced,) = decoded
    assert reduced.factor == 4 and reduced.image.size == (400, 300)  # a 520 px short side // (2 x 64)
    prep = PrepareConfig(view_size=tiny_cfg.image_size, candidate_ts=tiny_cfg.views.candidate_ts)
    record = {"image_id": "i", "file": "f", "regions": [{"region_id": str(i), "box": b} for i, b in enumerate(boxes)]}
    rows, _ = preprocess_image(record, image, prep)
    want = build_inputs(rows, {"f": decode_image(image)}, tiny_cfg.views, tiny_cfg.image_size, "fixed",
                        prepared_size=tiny_cfg.image_size)
    np.testing.assert_array_equal(got.inputs.view_boxes, want.view_boxes)
    np.testing.assert_array_equal(got.inputs.rois, want.rois)
    diff = np.abs(got.inputs.views.astype(int) - want.views.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


# ------------------------------------------------------------------------------------- the app over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APP = "dynrefer-reliability"
LIMITS = {"max_boxes": 8, "request_timeout_s": 40, "body_timeout_s": 2.0, "retry_after_s": 2.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_local, tiny_cfg):
    """A small app with two model replicas and short queues; Serve shut down afterwards."""
    import requests
    import torch
    from ray import serve

    from dynrefer.checkpoint import save_pretrained
    from dynrefer.model import DynRefer
    from pipelines.serve import app_builder

    root = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    save_pretrained(DynRefer(tiny_cfg), str(root / "model"))
    one, two = {"min_replicas": 1, "max_replicas": 1}, {"min_replicas": 2, "max_replicas": 2}
    args = {"model": str(root / "model"), "limits": LIMITS,
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.1},
            "ingress": {"num_cpus": 0.05, "max_ongoing_requests": 64, "max_queued_requests": 16, "autoscaling": one},
            "preprocess": {"num_cpus": 0.05, "max_ongoing_requests": 2, "max_queued_requests": 2, "autoscaling": one},
            "predictor": {"num_cpus": 0.05, "max_ongoing_requests": 8, "max_queued_requests": 4, "autoscaling": two}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 150})
    try:
        serve.run(app_builder(args), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert requests.get(base + "/healthz", timeout=60).json() == {"status": "ok"}
        yield {"base": base, "port": port}
    finally:
        serve.shutdown()


BODY = {"image": base64.b64encode(picture(640, 480, fmt="JPEG")).decode(), "boxes": [[40, 60, 300, 400]]}


def replicas_rss() -> int:
    """Resident bytes of every replica process of the test app."""
    import psutil

    from pipelines.serve import replica_processes

    pids = [pid for name in ("Ingress", "Preprocess", "Predictor") for pid in replica_processes(APP, name).values()]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


@pytest.mark.slow
def test_a_burst_is_answered_in_time_shed_fast_with_503_and_memory_returns_to_baseline(server):
    import requests

    url = server["base"] + "/v1/regions"
    for _ in range(2):
        assert requests.post(url, json=BODY, timeout=60).status_code == 200  # warm: first forwards, allocator
    baseline = replicas_rss()
    burst, timeout = 48, 60.0

    def send(_):
        start = time.monotonic()
        r = requests.post(url, json=BODY, timeout=timeout)
        return r.status_code, time.monotonic() - start, r.headers.get("retry-after"), r.text

    with ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(send, range(burst)))
    ok = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] == 503]
    print(f"burst of {burst}: {len(ok)} answered, {len(shed)} shed; slowest answer {max(a[1] for a in ok):.1f} s, "
          f"slowest 503 {max((a[1] for a in shed), default=0):.1f} s")
    assert len(ok) + len(shed) == burst and ok and shed, [a[:3] for a in answers]
    assert all(a[1] < timeout for a in answers)
    import json

    for status, seconds, retry, text in shed:
        assert retry == "2" and json.loads(text)["error"] == "overloaded", text
    assert np.median([a[1] for a in shed]) < 5.0  # shed at once, not after queueing
    time.sleep(2)
    after = replicas_rss()
    assert after < baseline + 100e6, (baseline, after)
    assert requests.post(url, json=BODY, timeout=60).status_code == 200


def trickle(port: int, stop: threading.Event) -> tuple[int, float, bytes]:
    """A client that sends its headers, then one body byte every 0.3 s: (status, seconds to the answer, body)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/regions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n")
        s.settimeout(0.3)
        reply = b""
        while not stop.is_set() and time.monotonic() - start < 30:
            try:
                s.sendall(b" ")
            except OSError:
                break
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            reply += chunk
            if b"\r\n\r\n" in reply and b"}" in reply:
                break
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    return status, time.monotonic() - start, body


@pytest.mark.slow
def test_trickling_uploads_get_a_408_at_the_body_timeout_and_the_service_keeps_answering(server):
    import json

    import requests

    stop, clients = threading.Event(), 12
    with ThreadPoolExecutor(clients) as pool:
        slow = [pool.submit(trickle, server["port"], stop) for _ in range(clients)]
        time.sleep(0.5)
        start = time.monotonic()
        r = requests.post(server["base"] + "/v1/regions", json=BODY, timeout=60)
        served_in = time.monotonic() - start
        try:
            results = [f.result(timeout=40) for f in slow]
        finally:
            stop.set()
    assert r.status_code == 200 and served_in < 30
    for status, seconds, body in results:
        assert status == 408 and json.loads(body[body.index(b"{"):])["error"] == "body_timeout", body
        assert seconds < LIMITS["body_timeout_s"] + 8, seconds


@pytest.mark.slow
def test_requests_lost_with_a_killed_model_replica_get_503_and_healthz_reports_it(server):
    """Runs last: SIGKILL one of the two model replicas under load."""
    import json

    import requests

    from pipelines.serve import replica_processes

    url, stop, lock = server["base"] + "/v1/regions", threading.Event(), threading.Lock()
    results: list[tuple[float, int, str | None, str]] = []

    def client() -> None:
        while not stop.is_set():
            r = requests.post(url, json=BODY, timeout=60)
            with lock:
                results.append((time.monotonic(), r.status_code, r.headers.get("retry-after"), r.text))

    def health() -> tuple[int, dict]:
        r = requests.get(server["base"] + "/healthz", timeout=30)
        return r.status_code, r.json()

    before = replica_processes(APP, "Predictor")
    assert len(before) == 2
    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(client) for _ in range(4)]
        try:
            deadline = time.monotonic() + 60
            while len(results) < 8 and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(next(iter(before.values())), signal.SIGKILL)
            killed = time.monotonic()
            seen, checks = None, []  # (seconds after the kill, status, body) of every /healthz
            while time.monotonic() - killed < 20 and seen is None:
                checks.append((time.monotonic() - killed, *health()))
                seen = checks[-1] if checks[-1][2]["status"] == "degraded" else None
                time.sleep(0.3)
            recovered, after = None, {}
            while seen and time.monotonic() - killed < 120 and recovered is None:
                checks.append((time.monotonic() - killed, *health()))
                if checks[-1][1] == 200:
                    recovered, after = checks[-1][0], replica_processes(APP, "Predictor")
                time.sleep(0.5)
        finally:
            stop.set()
            for w in workers:
                w.result(timeout=90)
    timeline = [(round(t, 1), st, b.get("status"), sorted(b.get("deployments", {}))) for t, st, b in checks]
    print(f"healthz after the kill: {timeline}; request statuses {sorted({st for _, st, _, _ in results})}")
    # Serve notices the death within its 2 s health-check period; /healthz says so from then on (or sooner, when
    # a request met the dead replica), 503 until the replacement runs.
    assert seen is not None and seen[0] < 6.0, "healthz never reported the dead replica"
    assert all(b["status"] in ("degraded", "unavailable", "overloaded") for t, st, b in checks if st == 503), checks
    assert recovered is not None and len(after) == 2 and set(after.values()) != set(before.values()), checks
    assert any("Predictor" in b.get("deployments", {}) for _, _, b in checks), checks
    failed = [(st, retry, text) for _, st, retry, text in results if st != 200]
    assert all(st == 503 and retry == "2" and json.loads(text)["error"] in ("replica_lost", "overloaded")
               for st, retry, text in failed), failed
    assert len(replica_processes(APP, "Predictor")) == 2
