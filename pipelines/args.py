"""Command-line pieces every pipeline shares: job files, S3 settings and connecting to Ray."""

from __future__ import annotations

import argparse
import os
from typing import Any

import yaml

from dynrefer import storage


def read_job_file(path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A job's YAML file with the command line's non-None ``overrides`` set (dotted keys reach into sections)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    for key, value in overrides.items():
        if value is not None:
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
    return data


def absolute(path: str | None) -> str | None:
    """A local path made absolute, so that Ray workers with another working directory find it; URIs unchanged."""
    return os.path.abspath(path) if path and not storage.is_remote(path) else path


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 (for s3:// paths; unset values fall back to the usual AWS settings)")
    g.add_argument("--s3-endpoint", help="S3 endpoint URL, e.g. http://127.0.0.1:9000 for MinIO")
    g.add_argument("--s3-key", help="access key id")
    g.add_argument("--s3-secret", help="secret access key")
    g.add_argument("--s3-region", help="region name")


def storage_options_from_args(args: argparse.Namespace) -> storage.StorageOptions:
    return storage.s3_options(args.s3_endpoint, args.s3_key, args.s3_secret, args.s3_region)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. 'auto' inside `ray job submit` (default: start a local cluster)")


def init_ray(args: argparse.Namespace, worker_logs: bool = False) -> None:
    """Connect to (or start) Ray. ``worker_logs``: the workers' log lines are the program's progress display
    (Ray Train loops), and Ray Data's progress bars are turned off so as not to interleave with them."""
    import ray

    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=worker_logs)
    if worker_logs:
        ray.data.DataContext.get_current().enable_progress_bars = False


def setup_logging(verbose: bool = False) -> None:
    """One log format for every pipeline: time, level, component, message."""
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
