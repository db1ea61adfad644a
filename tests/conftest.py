"""Fixtures shared by the test modules."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from dynrefer import storage


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A local S3 (moto) for the whole session: {"endpoint_url", "storage_options"}.

    Tests create their own buckets (distinct names) with ``storage.filesystem(uri, options)[0].mkdir(bucket)``.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield {"endpoint_url": endpoint,
               "storage_options": storage.s3_options(endpoint_url=endpoint, key="testing", secret="testing")}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """One real local Ray cluster (2 CPUs) for every test that needs Ray; shut down at the end of the session.

    It runs with Ray's token auth, the token in the project's cache (as ``make test`` sets it up), and without
    the dashboard; processes the tests start inherit the two variables and so can join it.
    """
    import ray

    from pipelines.args import secure_ray_env

    secure_ray_env(force=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
