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


#: Where S3 credentials come from instead of the command line (whose arguments every user sees in ``ps``).
CREDENTIALS_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment, "
                    "name a profile of ~/.aws/credentials with --s3-profile or AWS_PROFILE, or put storage_options "
                    "(key, secret) in the job file")


class _RefuseSecret(argparse.Action):
    """``--s3-key``/``--s3-secret``: refused, since a secret in argv shows in ``ps`` and shell history."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string}: S3 credentials are not taken on the command line, where every user of "
                     f"the machine sees them in `ps`; {CREDENTIALS_HELP}")


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 (for s3:// paths)", "Credentials are never flags: " + CREDENTIALS_HELP + "; "
                             "without any, each process uses the usual AWS settings (config files, instance role).")
    g.add_argument("--s3-endpoint", help="S3 endpoint URL, e.g. http://127.0.0.1:9000 for MinIO "
                                         "(default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)")
    g.add_argument("--s3-region", help="region name (default: AWS_REGION or AWS_DEFAULT_REGION)")
    g.add_argument("--s3-profile", help="a profile of the AWS config files (default: AWS_PROFILE)")
    for flag in ("--s3-key", "--s3-secret"):
        g.add_argument(flag, action=_RefuseSecret, help=argparse.SUPPRESS)


def storage_options_from_args(args: argparse.Namespace,
                              environ: dict[str, str] | None = None) -> storage.StorageOptions:
    """S3 storage_options from the flags and the environment (:func:`dynrefer.storage.s3_options_from_env`)."""
    return storage.s3_options_from_env(environ, endpoint_url=args.s3_endpoint, region=args.s3_region,
                                       profile=args.s3_profile)


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
