"""Command-line pieces every pipeline shares: S3 settings and connecting to Ray."""

from __future__ import annotations

import argparse

from dynrefer import storage


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


def init_ray(args: argparse.Namespace) -> None:
    import ray

    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False)


def setup_logging(verbose: bool = False) -> None:
    """One log format for every pipeline: time, level, component, message."""
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
