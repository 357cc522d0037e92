"""``python -m megl_ray.storage serve``: run the embedded S3 server until SIGINT/SIGTERM; ``cache [--clear]``: the
local copies of ``s3://`` models (where, how many files, how many bytes), removed with ``--clear``."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, setup_logging
from megl_ray.errors import UserError
from megl_ray.storage.embedded import (
    EMBEDDED_ACCESS_KEY,
    EMBEDDED_SECRET_ENV,
    EMBEDDED_SECRET_KEY_DEFAULT,
    EmbeddedS3,
)
from megl_ray.storage.errors import EmbeddedServerError
from megl_ray.storage.transfer import CACHE_DIR_VAR, cache_size, clear_cache
from megl_ray.storage.weed import _GRPC_PORT_OFFSET, _tail

log = logging.getLogger("megl_ray.storage")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``serve``: run the embedded S3 server until SIGINT/SIGTERM. Returns the result dict for ``run_cli``."""
    parser = ArgumentParser(prog="python -m megl_ray.storage", description="S3 storage utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the embedded SeaweedFS S3 server",
        description=(
            "Run a single-process SeaweedFS (master, volume, filer, S3), on 127.0.0.1 by default. Prints one JSON line "
            '{"endpoint_url", "data_dir", "access_key"} once it serves, then runs until SIGINT/SIGTERM. '
            f"The secret key is read from ${EMBEDDED_SECRET_ENV} (default: {EMBEDDED_SECRET_KEY_DEFAULT!r}, a "
            "development secret) and is never printed."
        ),
    )
    serve.add_argument("--data-dir", required=True, help="where objects, metadata and weed.log live (kept across runs)")
    serve.add_argument(
        "--port", type=int, default=None, help="S3 port (default: a free one; port+10000 must be free too)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind and advertise (default 127.0.0.1)")
    serve.add_argument(
        "--access-key", default=EMBEDDED_ACCESS_KEY, help=f"S3 access key id (default {EMBEDDED_ACCESS_KEY!r})"
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    cache = commands.add_parser(
        "cache",
        help="show (or --clear) the local copies of s3:// models",
        description=f"The cache of s3:// model copies: ${CACHE_DIR_VAR}, else $MEGL_HOME/cache/s3.",
    )
    cache.add_argument("--clear", action="store_true", help="remove every cached copy")
    args = parser.parse_args(argv)
    if args.command == "cache":
        root, files, size = (clear_cache if args.clear else cache_size)()
        return {"cache_dir": str(root), "files": files, "bytes": size, "cleared": args.clear}
    setup_logging(args.verbose)
    if args.port is not None and not 1 <= args.port <= 65535 - _GRPC_PORT_OFFSET:
        raise UserError(
            f"--port {args.port}: not a valid port here (1..{65535 - _GRPC_PORT_OFFSET}: the gRPC port "
            f"is port+{_GRPC_PORT_OFFSET})"
        )
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir}: exists and is not a folder")

    server = EmbeddedS3(
        args.data_dir,
        host=args.host,
        port=args.port,
        access_key=args.access_key,
        secret_key=os.environ.get(EMBEDDED_SECRET_ENV) or EMBEDDED_SECRET_KEY_DEFAULT,
    )
    stop_requested = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop_requested.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        server.start()
        info = {"endpoint_url": server.endpoint_url, "data_dir": str(server.data_dir), "access_key": server.access_key}
        print(json.dumps(info), flush=True)
        while not stop_requested.wait(1.0):
            if not server.running:
                raise EmbeddedServerError(
                    f"embedded S3 exited unexpectedly; last lines of {server.log_path}:\n{_tail(server.log_path)}"
                )
        log.info("received %s; stopping", received[0] if received else "stop")
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return {**info, "stopped": True, "signal": received[0] if received else None}
