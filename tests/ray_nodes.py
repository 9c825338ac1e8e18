"""Ray nodes started as `ray start --block` processes on this machine (a head with the dashboard, workers), for the
tests that need a real cluster with the Job Submission API: each node is one process group, stopped as Ray drains it."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_range(size: int) -> tuple[int, int]:
    """A run of bindable ports below the ephemeral range and above Ray's default worker ports (10002-19999)."""
    for _ in range(50):
        base = random.randrange(20_000, 30_000 - size)
        try:
            with ExitStack() as stack:
                for port in range(base, base + size):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base, base + size - 1
        except OSError:
            continue
    raise RuntimeError("no free port range")


def node_ports() -> list[str]:
    manager, objects, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    low, high = free_range(40)
    return [
        "--node-ip-address",
        "127.0.0.1",
        "--node-manager-port",
        str(manager),
        "--object-manager-port",
        str(objects),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
        "--min-worker-port",
        str(low),
        "--max-worker-port",
        str(high),
    ]


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Its own session: the whole node (ray start --block and what it spawns) is one process group to stop.
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_node(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # `ray start --block` drains and stops its node's processes on SIGTERM; signalling the whole group at once
    # would kill the GCS under it and leave it waiting a minute for a GCS that is gone.
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(check, timeout_s: float, what: str, processes=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a ray node exited while waiting for {what}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(what)


def node_env() -> dict[str, str]:
    """This process's environment for a node: no address of another cluster, `gemma-unified` on PATH for jobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"  # token auth is Ray's business, not these tests'; see the README for clients
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain at teardown
    return env


@dataclass
class Head:
    process: subprocess.Popen
    gcs_address: str  # HEAD:PORT, for drivers and `gemma-unified serve --address`
    address: str  # the dashboard, http://HEAD:PORT: where jobs are submitted

    @classmethod
    def start(cls, env: dict, log: Path, temp_dir: str, num_cpus: int, object_store_mb: int = 200) -> Head:
        """A head node with the dashboard, up and answering the Job Submission API."""
        from ray.job_submission import JobSubmissionClient

        gcs_port, dashboard_port, client_port = free_ports(3)
        process = start_node(
            [
                "--head",
                "--port",
                str(gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard_port),
                "--include-dashboard",
                "true",
                "--ray-client-server-port",
                str(client_port),
                "--num-cpus",
                str(num_cpus),
                "--object-store-memory",
                str(object_store_mb * 1024 * 1024),
                "--temp-dir",
                temp_dir,
                *node_ports(),
            ],
            env,
            log,
        )
        head = cls(process, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
        try:
            wait_until(lambda: JobSubmissionClient(head.address), 90, "the head", [process])
        except BaseException:
            stop_node(process)
            raise
        return head
