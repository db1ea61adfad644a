"""Local paths and ``s3://`` URIs behind one interface (fsspec), so every reader and writer takes either.

S3 settings (endpoint, credentials) travel as explicit ``storage_options`` rather than environment
variables, because environment set after ``ray.init`` does not reach Ray workers. Programs build them from the
standard AWS environment variables (:func:`s3_options_from_env`), never from command-line secrets.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec

StorageOptions = dict[str, Any]


def s3_options(endpoint_url: str | None = None, key: str | None = None, secret: str | None = None,
               region: str | None = None) -> StorageOptions:
    """storage_options for s3fs, e.g. for a MinIO/moto endpoint; empty values fall back to the AWS defaults."""
    opts: StorageOptions = {}
    if key:
        opts["key"] = key
    if secret:
        opts["secret"] = secret
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def s3_options_from_env(environ: dict[str, str] | None = None, endpoint_url: str | None = None,
                        region: str | None = None, profile: str | None = None) -> StorageOptions:
    """storage_options from the standard AWS environment variables (explicit arguments win).

    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` become explicit options, so that
    Ray workers get them even where the driver's environment does not reach; so do ``AWS_ENDPOINT_URL_S3`` (or
    ``AWS_ENDPOINT_URL``), ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``) and ``AWS_PROFILE``. Without a key, s3fs
    falls back to botocore's own chain in each process: the AWS config files, then an instance role.
    """
    env = os.environ if environ is None else environ
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        raise ValueError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together")
    opts = s3_options(endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"), key, secret,
                      region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
    if key and env.get("AWS_SESSION_TOKEN"):
        opts["token"] = env["AWS_SESSION_TOKEN"]
    profile = profile or env.get("AWS_PROFILE")
    if profile and not key:
        opts["profile"] = profile
    return opts


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}) if is_remote(uri) else {})
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write a whole object atomically: a local file appears complete or not at all (an S3 PUT already is)."""
    if is_remote(uri):
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def remove(uri: str, storage_options: StorageOptions | None = None) -> None:
    """Delete one object; one already gone is fine (a rerun or another process may have removed it)."""
    fs, path = filesystem(uri, storage_options)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def listdir(uri: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Base names of the objects directly under a directory or prefix; empty when it does not exist."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def exists(uri: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def read_json(uri: str, storage_options: StorageOptions | None = None) -> Any:
    """Parse a JSON file; a malformed one raises a ValueError that names the file and position."""
    data = read_bytes(uri, storage_options)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def write_json(uri: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(obj).encode(), storage_options)


def local_copy(uri: str, storage_options: StorageOptions | None = None, cache_dir: str | None = None) -> str:
    """A local path for ``uri``: itself when local, else a cached download of the file or directory.

    Weight loaders (open_clip checkpoints, Hugging Face directories) take local paths; this lets them take s3://.
    The cache key includes the objects' sizes and ETags, so a re-uploaded object is fetched again.
    """
    if not is_remote(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    import hashlib

    fs, path = filesystem(uri, storage_options)
    listing = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    version = json.dumps(sorted((k, v.get("size"), str(v.get("ETag", v.get("LastModified", ""))))
                                for k, v in listing.items()))
    digest = hashlib.sha256((uri + version).encode()).hexdigest()[:16]
    cache = cache_dir or os.environ.get("DYNREFER_CACHE", os.path.expanduser("~/.cache/dynrefer"))
    target = os.path.join(cache, "remote", digest, uri.rstrip("/").rsplit("/", 1)[-1])
    done = target + ".complete"
    if os.path.exists(done):
        return target
    if len(listing) > 1 or fs.isdir(path):
        fs.get(path.rstrip("/") + "/", target, recursive=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get(path, target)
    open(done, "w").close()
    return target


def arrow_filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem (with the explicit S3 settings) and the path in it, for Ray Data and Ray Train."""
    import pyarrow.fs

    if not is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    fs, path = filesystem(uri, storage_options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
