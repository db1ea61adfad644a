"""Load on the Serve app at 127.0.0.1: throughput and p50/p99 latency at 1, 4 and 16 clients, @serve.batch on vs off,
for /v1/regions and the OpenAI-compatible /v1/chat/completions.

One run deploys the app twice on a local Ray cluster (batching on and off, in --modes order; the same untrained
tiny model, the same image and boxes), sends requests to each of --routes from N client threads for a fixed time
per level (at most --max-requests), and prints one row per (mode, route, clients). The chat request is what the
openai client sends: the same JPEG as a data: URL in a user message, the same boxes in the ``boxes`` extension
field, so the two routes differ only in how the request is read and the answer written. A poller reads
``serve.status()`` every 0.5 s for the replicas the autoscaler asked for and those running (model and
preprocessing: 1..2 replicas, 1 s upscale and 4 s downscale delays); after each mode it waits for them to scale
back to one. Every request must succeed; the exit
code is 1 otherwise.

With --kill-replica it runs one other scenario instead: two model replicas, the largest --levels client count for
--seconds, and one model replica SIGKILLed a third of the way in; it prints failed/total requests, the slowest
request and how long Serve took to run a replacement. The exit code is 1 if no replacement ran within 120 s, a
request hung (no answer within its 120 s client timeout) or more requests failed than there are clients (only
those under way on the killed replica may).

With --burst N it runs a burst instead: N requests at once (--boxes boxes each, the 640x480 JPEG) against the
shipped queue bounds (configs/serve/local.yaml's deployment settings), then with --big-images M a burst of M
6300x6300 PNGs (8 MB each, multipart, four boxes of 1000+ px); it prints, per burst, requests answered (200),
shed (503 with Retry-After), other failures, p50/p99 of the answered and the slowest 503, and the peak and final
resident memory of the Preprocess replica and of all replicas (sampled every 0.1 s; final: 5 s after the burst).
The exit code is 1 if any request failed otherwise or got no answer within its client timeout.

    .venv/bin/python benchmarks/serve_load.py [--seconds 20] [--boxes 2] [--modes on,off] [--routes regions,chat]
    .venv/bin/python benchmarks/serve_load.py --kill-replica
    .venv/bin/python benchmarks/serve_load.py --burst 200 --boxes 100 --big-images 16
"""

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


APP = "bench"


def export_tiny_model(path: str) -> None:
    import torch

    from dynrefer.checkpoint import save_pretrained
    from dynrefer.config import load_config
    from dynrefer.model import DynRefer

    cfg = load_config("tiny")
    cfg.tags.vocabulary = ["red", "blue", "circle", "square", "striped", "dotted"]
    cfg.language.max_new_tokens = 8
    torch.manual_seed(0)
    save_pretrained(DynRefer(cfg), path)


def request_body(boxes: int, route: str = "regions") -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 80, (480, 640, 3), dtype=np.uint8))
    ImageDraw.Draw(img).ellipse([200, 120, 440, 360], fill=(40, 90, 230))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    regions = [[40 + 60 * j, 40 + 30 * j, 240 + 60 * j, 300 + 30 * j] for j in (i % 8 for i in range(boxes))]
    image = base64.b64encode(out.getvalue()).decode()
    if route == "chat":
        content = [{"type": "text", "text": "Describe the regions."},
                   {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image}}]
        return json.dumps({"model": "dynrefer", "messages": [{"role": "user", "content": content}],
                           "boxes": regions}).encode()
    return json.dumps({"image": image, "boxes": regions}).encode()


ROUTES = {"regions": "/v1/regions", "chat": "/v1/chat/completions"}


def app_args(model: str, batching: bool, min_predictors: int = 1) -> dict:
    """Small deployments that fit 2 logical CPUs at their maximum: 0.1 + 2 x 0.4 + 2 x 0.5."""
    scaling = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0,
               "metrics_interval_s": 0.5, "look_back_period_s": 2.0}
    return {"model": model, "batching": {"enabled": batching, "max_batch_size": 8, "batch_wait_timeout_s": 0.02},
            "limits": {"request_timeout_s": 120},
            "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64,
                        "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            "preprocess": {"num_cpus": 0.4, "max_ongoing_requests": 8,
                           "autoscaling": {**scaling, "target_ongoing_requests": 4}},
            "predictor": {"num_cpus": 0.5, "max_ongoing_requests": 16,
                          "autoscaling": {**scaling, "target_ongoing_requests": 4, "min_replicas": min_predictors}}}


def known_args(args: dict, config_class: type | None = None) -> dict:
    """``args`` without the keys this checkout's ServeConfig lacks, so that one benchmark measures older versions
    of the app too (``PYTHONPATH=<old checkout>``)."""
    import dataclasses
    import typing

    from pipelines.serve import ServeConfig

    cls = config_class or ServeConfig
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in args:
            value, kind = args[f.name], hints[f.name]
            out[f.name] = known_args(value, kind) if isinstance(value, dict) and dataclasses.is_dataclass(kind) \
                else value
    return out


def burst_args(model: str) -> dict:
    """The shipped local config's deployment settings (its queue bounds, two model replicas), this model."""
    from pipelines.serve import read_serve_file

    (app,) = read_serve_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "serve",
                                          "local.yaml"))["applications"]
    return known_args({**app["args"], "model": model, "proposals": None})


def big_image_body(boxes: int = 4) -> tuple[str, bytes]:
    """(Content-Type, multipart body) of a 6300x6300 PNG (39.7 Mpx, under the 40 Mpx limit) and its boxes."""
    import numpy as np
    from PIL import Image, ImageDraw

    width = 6300
    rng = np.random.default_rng(0)
    img = Image.new("RGB", (width, width), (90, 140, 60))
    draw = ImageDraw.Draw(img)
    for _ in range(60):
        x, y = (int(v) for v in rng.integers(0, width - 1500, 2))
        draw.ellipse([x, y, x + int(rng.integers(200, 1500)), y + int(rng.integers(200, 1500))],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.paste(Image.fromarray(rng.integers(0, 255, (400, width, 3), dtype=np.uint8)), (0, 3000))
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    regions = [[300 + 1400 * i, 200 + 1300 * i, 1500 + 1400 * i, 1400 + 1300 * i] for i in range(boxes)]
    boundary = "dynrefer-bench"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + out.getvalue() + (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="boxes"\r\n\r\n{json.dumps(regions)}\r\n'
        f"--{boundary}--\r\n").encode()
    return f"multipart/form-data; boundary={boundary}", body


class MemorySampler:
    """Peak resident memory of the app's replica processes, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.1):
        from pipelines.serve import replica_processes

        import psutil

        self.procs = {name: [psutil.Process(pid) for pid in replica_processes(APP, name).values()]
                      for name in ("Ingress", "Preprocess", "Predictor")}
        self.interval_s, self.peak = interval_s, {"Preprocess": 0, "all": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def replicas(self) -> dict[str, int]:
        return {name: len(procs) for name, procs in self.procs.items()}

    def now(self) -> dict[str, int]:
        rss = {name: sum(p.memory_info().rss for p in procs) for name, procs in self.procs.items()}
        return {"Preprocess": rss["Preprocess"], "all": sum(rss.values())}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for k, v in self.now().items():
                    self.peak[k] = max(self.peak[k], v)
            except Exception:  # noqa: BLE001 - a replica may be restarting; sample again
                pass
            self.stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self.start = self.now()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def burst(url: str, ctype: str, body: bytes, requests: int, timeout: float = 120.0) -> dict:
    """``requests`` requests sent at once: what was answered, shed, and the replicas' memory."""
    def one(_) -> tuple[int, float, str | None]:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
                return r.status, time.perf_counter() - start, None
        except urllib.error.HTTPError as e:
            e.read()
            return e.code, time.perf_counter() - start, e.headers.get("Retry-After")
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            return 0, time.perf_counter() - start, None

    with MemorySampler() as memory:
        with ThreadPoolExecutor(requests) as pool:
            results = list(pool.map(one, range(requests)))
        time.sleep(5)
        final = memory.now()
    ok = sorted(s for st, s, _ in results if st == 200)
    shed = [s for st, s, retry in results if st == 503 and retry is not None]
    pct = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))]) if ok else (lambda q: float("nan"))
    return {"requests": requests, "answered": len(ok), "shed": len(shed),
            "failed": requests - len(ok) - len(shed), "p50_s": pct(0.5), "p99_s": pct(0.99),
            "slowest_503_s": max(shed, default=float("nan")), "replicas": memory.replicas(),
            "preprocess_mb": {"start": memory.start["Preprocess"] / 2 ** 20,
                              "peak": memory.peak["Preprocess"] / 2 ** 20, "final": final["Preprocess"] / 2 ** 20},
            "all_mb": {"start": memory.start["all"] / 2 ** 20, "peak": memory.peak["all"] / 2 ** 20,
                       "final": final["all"] / 2 ** 20}}


def print_burst(what: str, row: dict) -> None:
    p, a = row["preprocess_mb"], row["all_mb"]
    print(f"{what}: {row['requests']} at once: answered {row['answered']}, shed {row['shed']} (503 + Retry-After), "
          f"failed {row['failed']}; answered p50 {row['p50_s']:.1f} s, p99 {row['p99_s']:.1f} s; slowest 503 "
          f"{row['slowest_503_s']:.2f} s; Preprocess RSS ({row['replicas']['Preprocess']} replicas) {p['start']:.0f} "
          f"-> peak {p['peak']:.0f} -> "
          f"{p['final']:.0f} MB; all replicas {a['start']:.0f} -> peak {a['peak']:.0f} -> {a['final']:.0f} MB")


class ReplicaPoller:
    """Running replicas per deployment, sampled from serve.status() in a background thread."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.latest: dict[str, int] = {}  # running replicas per deployment
        self.peak: dict[str, int] = {}  # most running replicas since reset_peak
        self.peak_wanted: dict[str, int] = {}  # most replicas running or starting since reset_peak
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> tuple[dict[str, int], dict[str, int]]:
        from ray import serve

        app = serve.status().applications.get(APP)
        if app is None:
            return {}, {}

        def count(states, names):
            return sum(n for state, n in states.items() if str(getattr(state, "value", state)) in names)

        running = {name: count(d.replica_states, {"RUNNING"}) for name, d in app.deployments.items()}
        wanted = {name: count(d.replica_states, {"RUNNING", "STARTING"}) for name, d in app.deployments.items()}
        return running, wanted

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.latest, wanted = self.sample()
            except Exception:  # noqa: BLE001 - the controller may be busy redeploying; try again next tick
                wanted = {}
            for name, n in self.latest.items():
                self.peak[name] = max(self.peak.get(name, 0), n)
            for name, n in wanted.items():
                self.peak_wanted[name] = max(self.peak_wanted.get(name, 0), n)
            self.stop.wait(self.interval_s)

    def reset_peak(self) -> None:
        self.peak, self.peak_wanted = dict(self.latest), dict(self.latest)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def post(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, float, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, payload = e.code, {}
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        status, payload = 0, {}
    return status, time.perf_counter() - start, payload


TIMEOUT_S = 120.0  # each request's client timeout


def load_level(url: str, body: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    """Requests from ``clients`` threads, each sending the next as soon as one returns, for ``seconds``."""
    lock = threading.Lock()
    issued = [0]
    results: list[tuple[int, float, int]] = []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while True:
            with lock:
                if issued[0] >= max_requests or time.perf_counter() > deadline:
                    return
                issued[0] += 1
            status, seconds, payload = post(url, body, TIMEOUT_S)
            with lock:
                batch = payload.get("batch") or payload.get("dynrefer", {}).get("batch", {})  # chat: the extension
                results.append((status, seconds, batch.get("requests", 0)))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    ok = sorted(s for st, s, _ in results if st == 200)
    shared = [b for st, _, b in results if st == 200]
    pct = (lambda q: 1000 * ok[min(len(ok) - 1, int(q * len(ok)))]) if ok else (lambda q: float("nan"))
    return {"clients": clients, "requests": len(results), "failed": sum(st != 200 for st, _, _ in results),
            "hung": sum(s >= TIMEOUT_S - 1 for _, s, _ in results),  # no answer before the client gave up
            "slowest_s": max((s for _, s, _ in results), default=float("nan")), "throughput": len(ok) / wall,
            "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
            "p99_ms": pct(0.99), "mean_shared": statistics.mean(shared) if shared else float("nan")}


def wait_for_scale_down(poller: ReplicaPoller, deployment: str, replicas: int, timeout_s: float) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if poller.latest.get(deployment) == replicas:
            return time.perf_counter() - start
        time.sleep(0.5)
    return None


def kill_replica(url: str, body: bytes, clients: int, seconds: float, poller: ReplicaPoller) -> dict:
    """The load of :func:`load_level` with one of the model replicas SIGKILLed a third of the way in."""
    from pipelines.serve import replica_processes

    before = replica_processes(APP, "Predictor")
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(load_level, url, body, clients, seconds, 10 ** 9)
        time.sleep(seconds / 3)
        victim = min(before)
        os.kill(before[victim], signal.SIGKILL)
        killed, replaced_s = time.perf_counter(), None
        while time.perf_counter() - killed < 120:
            now = replica_processes(APP, "Predictor")
            if len(now) == len(before) and victim not in now and poller.latest.get("Predictor") == len(before):
                replaced_s = time.perf_counter() - killed
                break
            time.sleep(0.25)
        row = load.result()
    return {**row, "replicas_before": len(before), "replaced_after_s": replaced_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="load time per level")
    p.add_argument("--max-requests", type=int, default=2000, help="cap on requests per level")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    p.add_argument("--modes", default="on,off", help="@serve.batch on/off, in this order")
    p.add_argument("--boxes", type=int, default=2, help="boxes per request")
    p.add_argument("--routes", default="regions,chat", help="routes to load: regions, chat (in this order)")
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    p.add_argument("--kill-replica", action="store_true", help="instead: kill one of two model replicas under load")
    p.add_argument("--burst", type=int, default=0, help="instead: this many requests at once (then --big-images)")
    p.add_argument("--big-images", type=int, default=0, help="with --burst: then this many 6300x6300 PNGs at once")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from pipelines.serve import app_builder

    levels = [int(x) for x in args.levels.split(",")]
    routes = [r.strip() for r in args.routes.split(",")]
    if not set(routes) <= set(ROUTES):
        p.error(f"--routes: from {', '.join(ROUTES)}")
    body = request_body(args.boxes)
    bodies = {r: request_body(args.boxes, r) for r in routes}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    url = base + ROUTES["regions"]
    rows, scale_downs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        export_tiny_model(model)
        from pipelines.args import secure_ray_env

        secure_ray_env()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        poller = None
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 150})
            poller = ReplicaPoller()
            if args.burst:
                serve.run(app_builder(burst_args(model)), name=APP, route_prefix="/")
                for _ in range(3):
                    post(url, body)
                rows = [("small JPEG", burst(url, "application/json", body, args.burst))]
                print_burst(*rows[0])
                if args.big_images:
                    rows.append(("6300x6300 PNG", burst(url, *big_image_body(), args.big_images)))
                    print_burst(*rows[1])
                print(json.dumps(dict(rows)))
                return int(any(r["failed"] for _, r in rows))
            if args.kill_replica:
                serve.run(app_builder(app_args(model, True, min_predictors=2)), name=APP, route_prefix="/")
                for _ in range(5):
                    post(url, body)
                row = kill_replica(url, body, max(levels), args.seconds, poller)
                print(json.dumps(row), flush=True)
                replaced = row["replaced_after_s"]
                print(f"\nkill one of {row['replicas_before']} model replicas under {row['clients']} clients: failed "
                      f"{row['failed']}/{row['requests']}, hung {row['hung']}, slowest {row['slowest_s']:.1f} s, "
                      f"replacement running after "
                      + (f"{replaced:.1f} s" if replaced is not None else "- (none within 120 s)"))
                return int(replaced is None or row["hung"] > 0 or row["failed"] > row["clients"])
            for batching in [m.strip() == "on" for m in args.modes.split(",")]:
                mode = "batch on" if batching else "batch off"
                serve.run(app_builder(app_args(model, batching)), name=APP, route_prefix="/")
                for route in routes:
                    for _ in range(5):
                        post(base + ROUTES[route], bodies[route])  # warm-up: first forwards, tokenizer, allocator
                for route in routes:
                    for clients in levels:
                        for name in ("Predictor", "Preprocess"):
                            wait_for_scale_down(poller, name, 1, 60)
                        poller.reset_peak()
                        row = load_level(base + ROUTES[route], bodies[route], clients, args.seconds,
                                         args.max_requests)
                        replicas = {name: f"{poller.peak.get(name, 0)}/{poller.peak_wanted.get(name, 0)}"
                                    for name in ("Predictor", "Preprocess")}
                        row.update(mode=mode, route=route, replicas=replicas)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                at_end = dict(poller.latest)
                scale_downs[mode] = (at_end, {name: wait_for_scale_down(poller, name, 1, 60)
                                              for name in ("Predictor", "Preprocess")})
        finally:
            if poller is not None:
                poller.close()
            serve.shutdown()
            ray.shutdown()

    print(f"\n{' and '.join(ROUTES[r] for r in routes)}, {args.boxes} boxes per 640x480 JPEG, untrained tiny model, "
          f"{args.num_cpus} logical CPUs, {args.seconds:g} s per level; replicas: most running / most running or "
          f"starting\n")
    print(f"{'mode':<10}{'route':<8}{'clients':>8}{'requests':>9}{'failed':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'req/forward':>12}{'model repl.':>12}{'prep repl.':>11}")
    for r in rows:
        print(f"{r['mode']:<10}{r['route']:<8}{r['clients']:>8}{r['requests']:>9}{r['failed']:>7}"
              f"{r['throughput']:>8.2f}"
              f"{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['mean_shared']:>12.2f}{r['replicas']['Predictor']:>12}"
              f"{r['replicas']['Preprocess']:>11}")
    for mode, (at_end, waits) in scale_downs.items():
        for name, seconds in waits.items():
            took = f"back to 1 after {seconds:.1f} s idle" if seconds is not None else "not back to 1 within 60 s"
            print(f"{mode}: {name} replicas at the end of the load {at_end.get(name)}, {took}")
    failed = sum(r["failed"] for r in rows)
    print(f"\nfailed requests: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
