"""Helpers shared by the tests/*/test_storage_*.py modules (not a test module itself)."""

from __future__ import annotations

import os
import selectors
import socket
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Distinctive fake credentials: any occurrence in a message, repr or log line is a leak.
LEAK_ACCESS = "AKIALEAKCHECK7Q2Z9XW"
LEAK_SECRET = "leak-secret-5b1f0c9e-do-not-print"
LEAK_TOKEN = "leak-token-8d3a77e1-do-not-print"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return False
    except OSError:
        return True


def read_line(stream, timeout: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buffer = b""
    while not buffer.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not selector.select(remaining):
            raise TimeoutError(f"no line within {timeout}s (got {buffer!r})")
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            raise EOFError(f"stream closed (got {buffer!r})")
        buffer += chunk
    return buffer.decode()
