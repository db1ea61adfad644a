"""Command-line pieces every pipeline shares: job files, S3 settings and connecting to Ray."""

from __future__ import annotations

import argparse
import os
import secrets
from typing import Any, Mapping, MutableMapping

import yaml

from dynrefer import storage
from dynrefer.paths import REPO_ROOT


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
                   help="Ray cluster address, e.g. 'auto' inside `ray job submit` (default: start a local cluster, "
                        "with Ray's token auth and without the dashboard)")
    p.add_argument("--dashboard", action="store_true",
                   help="start the Ray dashboard with the local cluster (off by default: it serves the job API)")



def add_run_args(p: argparse.ArgumentParser, export_help: str) -> None:
    """The flags every Ray Train program takes: where the run lives, how long and wide it is, its export, and
    the Ray and S3 flags."""
    p.add_argument("--storage-path", help="checkpoint and export root, local or s3://")
    p.add_argument("--name", help="run name (the same storage path and name resume)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workers", type=int, help="number of training workers")
    p.add_argument("--export", help=export_help)
    add_ray_args(p)
    add_storage_args(p)


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The job-file keys that :func:`add_run_args`'s flags (and the S3 flags) override."""
    return {"storage_path": args.storage_path, "name": args.name, "max_steps": args.max_steps,
            "workers.num": args.workers, "export": args.export,
            "storage_options": storage_options_from_args(args) or None}


def launch(args: argparse.Namespace, run: Any, job: Any) -> int:
    """Connect to Ray, run a Ray Train program's job and print its summary as JSON."""
    import json

    setup_logging()
    init_ray(args, worker_logs=True)
    print(json.dumps(run(job), indent=2, default=str))
    return 0

#: The checkout this module runs from (its ``.cache`` is the Makefile's).
PROJECT_ROOT = REPO_ROOT


def cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """``DYNREFER_CACHE``, else ``.cache`` of the checkout (where the Makefile keeps torch extensions too); an
    installed copy (no checkout around it) uses ``$XDG_CACHE_HOME/dynrefer`` rather than site-packages."""
    environ = os.environ if environ is None else environ
    if environ.get("DYNREFER_CACHE"):
        return environ["DYNREFER_CACHE"]
    if os.path.exists(os.path.join(PROJECT_ROOT, "pyproject.toml")):
        return os.path.join(PROJECT_ROOT, ".cache")
    xdg = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "dynrefer")


def default_token_path(environ: Mapping[str, str] | None = None) -> str:
    """Where local clusters keep their token: inside the project's cache, not Ray's ``~/.ray/auth_token``."""
    return os.path.join(cache_dir(environ), "ray", "auth_token")


def write_token(path: str) -> str:
    """Create ``path`` with a fresh random token, readable by its owner only; an existing token is kept.

    Ray itself, asked for token auth without a token, writes one to ``~/.ray/auth_token`` whatever
    ``RAY_AUTH_TOKEN_PATH`` says, so the file must exist before Ray starts.
    """
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path) as f:
            if f.read().strip():
                return path
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def secure_ray_env(environ: MutableMapping[str, str] | None = None, force: bool = False) -> str | None:
    """Turn on Ray's token auth for the clusters this process starts, and for the processes it starts.

    Sets ``RAY_AUTH_MODE=token`` and, unless ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` already name a token,
    ``RAY_AUTH_TOKEN_PATH`` to :func:`default_token_path`, creating the token (0600) where it is missing. An
    explicit ``RAY_AUTH_MODE=disabled`` is kept (with a warning) unless ``force``. Returns the token file, or
    None when auth stays off or the token comes from ``RAY_AUTH_TOKEN``.
    """
    import logging

    environ = os.environ if environ is None else environ
    mode = environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token" and not force:
        logging.getLogger("dynrefer").warning(
            "RAY_AUTH_MODE=%s: the local Ray cluster takes jobs from anyone who can reach its ports", mode)
        return None
    environ["RAY_AUTH_MODE"] = "token"
    path = None
    if not (environ.get("RAY_AUTH_TOKEN") and not environ.get("RAY_AUTH_TOKEN_PATH")):
        path = write_token(environ.setdefault("RAY_AUTH_TOKEN_PATH", default_token_path(environ)))
    if environ is os.environ:
        _refresh_ray_auth()
    return path


def _refresh_ray_auth() -> None:
    """Make an already imported Ray see the new variables: its C++ config and token loader cache them at import
    (Ray's own ``_enable_token_auth`` does the same ``Config.initialize``)."""
    import sys

    if "ray._raylet" not in sys.modules:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def init_ray(args: argparse.Namespace, worker_logs: bool = False) -> None:
    """Connect to (or start) Ray. ``worker_logs``: the workers' log lines are the program's progress display
    (Ray Train loops), and Ray Data's progress bars are turned off so as not to interleave with them.

    A local cluster (no ``--address``) gets token auth (:func:`secure_ray_env`) and no dashboard unless
    ``--dashboard``. Connecting to a cluster, the token comes from the environment (``ray job submit`` hands
    the job's driver its cluster's); outside one, the project's token is used when it exists and nothing
    else was set.
    """
    import ray

    if args.address is None:
        secure_ray_env()
        ray.init(ignore_reinit_error=True, log_to_driver=worker_logs,
                 include_dashboard=bool(getattr(args, "dashboard", False)))
    else:
        if "RAY_AUTH_MODE" not in os.environ and os.path.exists(default_token_path()):
            secure_ray_env()
        ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=worker_logs)
    if worker_logs:
        ray.data.DataContext.get_current().enable_progress_bars = False


def setup_logging(verbose: bool = False) -> None:
    """One log format for every pipeline: time, level, component, message."""
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
