"""Ray's token auth on the project's clusters: clients without the token are refused by the GCS, the raylet and
the job API; the pipelines' own local clusters start with it, the token in the project's cache."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
import requests

from pipelines.args import default_token_path, secure_ray_env, write_token
from tests.ray_nodes import BIN, REPO, RayNodes, free_port, token_env, wait_for


def _gcs_call(address: str, token: str | None):
    """NodeInfoGcsService.GetAllNodeInfo on the GCS with ``token`` (None: no authorization metadata)."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        return stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=20)


def _raylet_call(address: str, token: str | None):
    from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(address) as channel:
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        return stub.GetSystemConfig(node_manager_pb2.GetSystemConfigRequest(), metadata=metadata, timeout=20)


def _code(call, *args) -> grpc.StatusCode:
    try:
        call(*args)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.timeout(300)
def test_a_token_cluster_refuses_clients_without_its_token(tmp_path):
    token_path = write_token(str(tmp_path / "token"))
    token = open(token_path).read().strip()
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600 and len(token) == 64
    with RayNodes(token_env(token_path)) as nodes:
        gcs = nodes.head(num_cpus=1)
        host = gcs.rsplit(":", 1)[0]

        # The GCS: no token and a wrong token are refused before any handler runs; the right one answers.
        assert _code(_gcs_call, gcs, None) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(_gcs_call, gcs, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
        nodes_info = _gcs_call(gcs, token).node_info_list
        assert len(nodes_info) == 1
        raylet = f"{host}:{nodes_info[0].node_manager_port}"

        # The raylet, reached directly.
        assert _code(_raylet_call, raylet, None) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(_raylet_call, raylet, token) == grpc.StatusCode.OK

        # The job API of the dashboard agent (up even without the dashboard): a job without the token is refused
        # and never runs; with it, the same request runs.
        jobs = f"http://{host}:{nodes.agent_port}/api/job_agent/jobs/"
        wait_for(lambda: _answers(jobs), 60, "the job agent")
        refused, ran = tmp_path / "refused", tmp_path / "ran"
        r = requests.post(jobs, json={"entrypoint": f"touch {refused}"}, timeout=30)
        assert r.status_code == 401, r.text
        r = requests.post(jobs, json={"entrypoint": f"touch {refused}"}, timeout=30,
                          headers={"Authorization": "Bearer " + "0" * 64})
        assert r.status_code in (401, 403), r.text
        r = requests.post(jobs, json={"entrypoint": f"touch {ran}"}, timeout=60,
                          headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        wait_for(ran.exists, 90, "the authorised job's file")
        time.sleep(2)
        assert not refused.exists()

        # A driver holding the token works as usual.
        driver = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(address=%r, log_to_driver=False); "
             "print(ray.get(ray.remote(lambda: 41 + 1).remote()))" % gcs],
            env=token_env(token_path), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert driver.returncode == 0 and driver.stdout.strip().endswith("42"), driver.stderr[-2000:]
        assert not nodes.stop()


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=5)
        return True
    except requests.RequestException:
        return False


LOCAL_CLUSTER = r"""
import argparse, json, os, grpc, ray
from pipelines.args import init_ray
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
init_ray(argparse.Namespace(address=None, dashboard=False))
gcs = ray.get_runtime_context().gcs_address
with grpc.insecure_channel(gcs) as ch:
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch).GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(),
                                                                        timeout=20)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
node = ray._private.worker.global_worker.node
print(json.dumps({"code": code, "mode": os.environ.get("RAY_AUTH_MODE"), "path": os.environ.get("RAY_AUTH_TOKEN_PATH"),
                  "dashboard": bool(ray._private.worker.get_dashboard_url()),
                  "answer": ray.get(ray.remote(lambda: 6 * 7).remote())}))
ray.shutdown()
"""


@pytest.mark.timeout(300)
def test_a_pipelines_local_cluster_starts_with_token_auth_and_no_dashboard(tmp_path):
    """`init_ray` without --address (every `dynrefer` stage run locally): token auth on, its token created 0600 in
    the project's cache (not ~/.ray), no dashboard; an unauthenticated client is refused by its GCS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), DYNREFER_CACHE=str(tmp_path / "cache"), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", LOCAL_CLUSTER], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    token_path = str(tmp_path / "cache" / "ray" / "auth_token")
    assert got == {"code": "UNAUTHENTICATED", "mode": "token", "path": token_path, "dashboard": False, "answer": 42}
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    assert not (tmp_path / "home" / ".ray").exists()


def test_secure_ray_env_keeps_a_given_token_and_an_explicit_opt_out(tmp_path):
    env = {"DYNREFER_CACHE": str(tmp_path)}
    assert secure_ray_env(env) == default_token_path(env) == str(tmp_path / "ray" / "auth_token")
    first = open(env["RAY_AUTH_TOKEN_PATH"]).read()
    assert env["RAY_AUTH_MODE"] == "token" and secure_ray_env(dict(env)) and open(default_token_path(env)).read() == first
    given = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "given")}
    assert secure_ray_env(given) == str(tmp_path / "given") and (tmp_path / "given").read_text() != first
    assert secure_ray_env({"RAY_AUTH_MODE": "disabled"}) is None
    forced = {"RAY_AUTH_MODE": "disabled", "DYNREFER_CACHE": str(tmp_path)}
    assert secure_ray_env(forced, force=True) and forced["RAY_AUTH_MODE"] == "token"
    only_env = {"RAY_AUTH_TOKEN": "x" * 32}
    assert secure_ray_env(only_env) is None and "RAY_AUTH_TOKEN_PATH" not in only_env


def test_every_shipped_cluster_runs_with_token_auth():
    """KubeRay manifests ask the operator for token auth; the launcher starts every node with the token it mounts;
    the Makefile exports token mode and a token inside the project's cache."""
    import yaml

    kuberay = os.path.join(REPO, "cluster", "kuberay")
    for name in sorted(os.listdir(kuberay)):
        with open(os.path.join(kuberay, name)) as f:
            spec = yaml.safe_load(f)["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        assert cluster.get("authOptions") == {"mode": "token"}, name
    with open(os.path.join(REPO, "cluster", "ray-cluster.aws.yaml")) as f:
        launcher = yaml.safe_load(f)
    token = [remote for remote, local in launcher["file_mounts"].items() if local == ".cache/ray/auth_token"]
    assert len(token) == 1
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in launcher[key] if "ray start" in c]
        assert start and all(f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token[0]};" in c for c in start), key
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    assert "export RAY_AUTH_MODE ?= token\n" in makefile and \
        "export RAY_AUTH_TOKEN_PATH ?= $(CURDIR)/.cache/ray/auth_token\n" in makefile


@pytest.mark.timeout(300)
def test_ray_job_submit_and_serve_pass_the_token_from_the_two_variables(tmp_path):
    """What the README and cluster/README say: `ray job submit` and the `serve` CLI send the token named by
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH; without them the dashboard refuses both."""
    token_path = write_token(str(tmp_path / "token"))
    env = token_env(token_path)
    bare = {**{k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    dashboard = f"http://127.0.0.1:{port}"
    with RayNodes(env) as nodes:
        nodes.head(num_cpus=1, dashboard_port=port)
        wait_for(lambda: _answers(dashboard + "/api/version"), 120, "the dashboard")

        def cli(environment, *argv):
            return subprocess.run([os.path.join(BIN, argv[0]), *argv[1:]], env=environment, cwd=str(tmp_path),
                                  capture_output=True, text=True, timeout=120)

        marker = tmp_path / "submitted"
        for environment, allowed in ((bare, False), (env, True)):
            job = cli(environment, "ray", "job", "submit", "--address", dashboard, "--", "touch", str(marker))
            status = cli(environment, "serve", "status", "-a", dashboard)
            assert (job.returncode == 0) is allowed and (status.returncode == 0) is allowed, (job.stderr, status.stderr)
            assert marker.exists() is allowed
            if not allowed:
                assert "Token authentication is enabled" in job.stdout + job.stderr
        assert not nodes.stop()
