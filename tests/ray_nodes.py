"""Real `ray start` nodes for tests: a head and further raylets on this machine, each with its own temp dir.

Nodes run `ray start --block` in their own session, so terminating that process stops the node's processes; what
is left of them is killed by pid. Never `ray stop`, which kills every Ray process of the machine by name (other
engineers' clusters included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

BIN = os.path.dirname(sys.executable)  # the venv's `ray`
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_env(token_path: str, **extra: str) -> dict[str, str]:
    """The environment of a process that holds the cluster's token (as the Makefile sets it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


class RayNodes:
    """A head (and optionally more raylets) started with `ray start`; use as a context manager."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        self.address: str | None = None
        self.agent_port: int | None = None

    def _start(self, args: list[str]) -> str:
        # Short temp dirs: Unix socket paths under them must stay under 108 bytes.
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        log = open(os.path.join(temp_dir, "ray-start.log"), "w")
        self.procs.append(subprocess.Popen(
            [os.path.join(BIN, "ray"), "start", "--block", "--temp-dir", temp_dir, "--disable-usage-stats", *args],
            cwd=REPO, env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
        return temp_dir

    def head(self, num_cpus: int = 1, resources: dict[str, float] | None = None, timeout: float = 120,
             dashboard_port: int | None = None) -> str:
        """Start the head and return its GCS address: no dashboard (its agent still serves the job API) unless
        ``dashboard_port``, where it listens on 127.0.0.1."""
        self.agent_port = free_port()
        dashboard = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                     str(dashboard_port)] if dashboard_port else ["--include-dashboard", "false"]
        temp_dir = self._start(["--head", "--port", str(free_port()), "--num-cpus", str(num_cpus),
                                *dashboard, "--dashboard-agent-listen-port", str(self.agent_port),
                                "--ray-client-server-port", str(free_port()),
                                "--resources", json.dumps(resources or {})])
        record = os.path.join(temp_dir, "ray_current_cluster")
        self.address = wait_for(lambda: open(record).read().strip() if os.path.exists(record) else None,
                                timeout, "the head's address", self.procs[-1])
        return self.address

    def worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None, timeout: float = 120) -> None:
        """Start another raylet joining the head, with its own temp dir and ``resources``; returns once the GCS
        lists it alive."""
        assert self.address, "start the head first"
        before = len(self.alive_nodes())
        self._start(["--address", self.address, "--num-cpus", str(num_cpus),
                     "--dashboard-agent-listen-port", str(free_port()),
                     "--resources", json.dumps(resources or {})])
        wait_for(lambda: len(self.alive_nodes()) > before, timeout, "the new node in the GCS", self.procs[-1])

    def alive_nodes(self) -> list[Any]:
        """The GCS's alive nodes, asked over gRPC with the cluster's token."""
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        with open(self.env["RAY_AUTH_TOKEN_PATH"]) as f:
            token = f.read().strip()
        with grpc.insecure_channel(self.address) as channel:
            reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=20)
        return [n for n in reply.node_info_list if n.state == n.ALIVE]

    def stop(self) -> list[psutil.Process]:
        """Stop every node (the head last); returns processes that outlived SIGKILL (none, normally)."""
        tree: list[psutil.Process] = []
        for p in self.procs:
            try:
                tree += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        # Processes the raylets forked later (workers) are found by their temp dir on the command line.
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if any(d in cmd for d in self.temp_dirs) and proc.pid != os.getpid():
                tree.append(proc)
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        return alive

    def __enter__(self) -> "RayNodes":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(fn, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` (or the node's exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode} before {what} appeared")
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not appear within {timeout:.0f}s")
