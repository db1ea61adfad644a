"""``dynrefer serve`` / ``python -m pipelines.serve``: start Serve on this machine (or join a cluster) and run the
applications of a Serve config file until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from ray import serve

from .app import app_builder
from .config import parse_config

log = logging.getLogger("dynrefer.serve")


def read_serve_file(path: str) -> dict[str, Any]:
    """A Serve config file (the format of ``serve deploy``) whose applications are all this module's app."""
    import yaml

    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    apps = spec.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    for a in apps:
        if a.get("import_path") != "pipelines.serve:app_builder":
            raise ValueError(f"{path}: application {a.get('name')!r} imports {a.get('import_path')!r}; "
                             f"dynrefer serve runs pipelines.serve:app_builder only")
        parse_config(a.get("args") or {})
    return spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer serve", description="Ray Serve application: region captions, tags "
                                "and text scores over HTTP, with a web page.")
    p.add_argument("--config", required=True, help="a Serve config file, e.g. configs/serve/local.yaml")
    p.add_argument("--model", help="exported model directory, overriding every application's args.model")
    p.add_argument("--host", help="bind address (default: the file's http_options.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the file's http_options.port, else 8000)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    import ray

    from pipelines.args import secure_ray_env

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = read_serve_file(args.config)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    http = {"host": "127.0.0.1", "port": 8000, **(spec.get("http_options") or {})}
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    secure_ray_env()  # token auth: Ray's ports listen beyond loopback
    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options=http, proxy_location=spec.get("proxy_location", "HeadOnly"))
        for a in spec["applications"]:
            app_args = {**(a.get("args") or {}), **({"model": args.model} if args.model else {})}
            serve.run(app_builder(app_args), name=a.get("name", "dynrefer"), route_prefix=a.get("route_prefix", "/"))
            log.info("application %s at http://%s:%s%s", a.get("name", "dynrefer"), http["host"], http["port"],
                     a.get("route_prefix", "/"))
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
