"""A multi-node Ray cluster on one machine, for tests and benches: real raylets, not mocks.

Each node is a ``ray start`` in a session of its own (its own temp dir, ports, ``--num-cpus``, object store and
custom resources such as ``{"node_a": 1}``) on 127.0.0.1, so a node can be lost the way a machine is lost: its whole
process group (the raylet, its agents and its workers) killed with SIGKILL. Only the processes started here are ever
signalled: other Ray instances on the machine are left alone (never ``ray stop``).

    with LocalCluster(Path("/tmp/c")) as cluster:
        cluster.add_node(num_cpus=2, resources={"node_a": 1})     # the first node is the head
        b = cluster.add_node(num_cpus=1, resources={"node_b": 1})
        ray.init(address=cluster.address)
        cluster.kill(b); cluster.add_node(num_cpus=1, resources={"node_b": 1})
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megl_ray.cluster.ray_env import worker_pool_env

# Lost nodes are noticed within seconds, not the default ~30 s: the GCS health-checks raylets every second.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    # The nodes share one machine's memory with everything else on it: Ray's memory monitor
    # would kill their workers for memory other programs use.
    "RAY_memory_monitor_refresh_ms": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalNode:
    name: str
    resources: dict[str, float]
    process: subprocess.Popen
    temp_dir: Path
    log: Path

    @property
    def pgid(self) -> int:
        """The node's process group: ``ray start`` leads it, and the raylet, agents and workers it starts stay in it."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        return _group_exists(self.pgid)


@dataclass
class LocalCluster:
    """Nodes started by ``add_node`` (the first is the head); ``shutdown`` kills every process group started."""

    root: Path
    object_store_mb: int = 300
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every node (S3 endpoint, DeepSpeed accelerator, ...): Ray workers inherit it."""
    start_timeout_s: float = 120.0
    nodes: list[LocalNode] = field(default_factory=list)
    port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        """The GCS address for ``ray.init(address=...)`` and ``python -m megl_ray.train --address``."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, num_cpus: float, resources: dict[str, float] | None = None, attempts: int = 3) -> LocalNode:
        """Start a node (the first one is the head) and wait until it is up. ``ray start`` gives a raylet 30 s to
        register with the GCS, which an overloaded machine can miss: the attempt's processes are killed and the
        node started again."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_node(num_cpus, dict(resources or {}))
            except RuntimeError:
                failed = self.nodes.pop()
                self.kill(failed)
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _start_node(self, num_cpus: float, resources: dict[str, float]) -> LocalNode:
        head = not self.nodes
        name = f"node{len(self.nodes)}"
        self.root.mkdir(parents=True, exist_ok=True)
        # Ray's unix sockets live under the temp dir and their paths are limited to ~107 bytes: keep it short.
        # ``--node-ip-address=127.0.0.1``: Ray rewrites a loopback address to the machine's own primary address
        # (``services.resolve_ip_for_localhost``; e.g. 192.0.2.2), and so does the driver's ``ray.init(address=
        # "127.0.0.1:...")``. The nodes show that address, which is still this machine's: the kernel routes it
        # through ``lo`` (``ip route get`` says ``local ... dev lo``), so no traffic leaves the machine. The only
        # switch that keeps 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) also refuses worker nodes.
        temp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
        # Not ``--block``: its monitor kills the whole node when any helper process (e.g. the Ray client server,
        # which times out on an overloaded machine) exits, which is not what a node's loss should depend on.
        args = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            f"--num-cpus={num_cpus:g}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            "--node-ip-address=127.0.0.1",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        if head:
            self.port, self.dashboard_port = free_port(), free_port()
            # The dashboard stays on: Ray Train's controller is watched through its state API.
            args += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            args += [f"--address={self.address}"]
        # No token authentication: every port is on loopback, and a driver of this machine connects without a token.
        env = {
            **os.environ,
            **FAST_FAILURE_DETECTION,
            **worker_pool_env(),
            "RAY_AUTH_MODE": "disabled",
            **self.env,
            # Ray Train's controller queries the state API without an address: with other Ray instances on the
            # machine, auto-detection fails, so name this cluster's dashboard.
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
        }
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        node = LocalNode(name, resources, process, temp, log)
        self.nodes.append(node)
        self._wait_started(node)
        return node

    def _wait_started(self, node: LocalNode) -> None:
        try:
            code = node.process.wait(timeout=self.start_timeout_s)  # ``ray start`` returns once the node is up
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"{node.name} did not start within {self.start_timeout_s:.0f} s: {node.log.read_text()[-2000:]}"
            ) from None
        if code != 0:
            raise RuntimeError(f"ray start of {node.name} failed ({code}): {node.log.read_text()[-2000:]}")

    def kill(self, node: LocalNode) -> None:
        """Lose ``node`` as a machine is lost: SIGKILL to its whole process group, no graceful shutdown."""
        try:
            os.killpg(node.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if node.process.poll() is None:
            node.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while node.alive and time.monotonic() < deadline:  # killed members linger until reaped by init
            time.sleep(0.1)

    def shutdown(self) -> None:
        # Workers first, then the head (whose GCS the others report to).
        for node in reversed(self.nodes):
            self.kill(node)
        self.nodes.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _group_exists(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group ``pgid`` remains."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
