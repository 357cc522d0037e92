"""``python -m megl_ray.storage.keeper DATA_DIR``: the parent of a shared embedded store's server (see
``megl_ray.storage.shared_store``). It starts the server, writes ``store.json`` (endpoint, its own pid) and serves
until SIGTERM (the last user leaving) or until no live user holds a lease (the last users crashed); its server dies
with it (parent-death signal)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from megl_ray.storage.embedded import EMBEDDED_SECRET_ENV, EMBEDDED_SECRET_KEY_DEFAULT, EmbeddedS3
from megl_ray.storage.shared_store import STATE_FILE, live_leases, locked

POLL_S = 1.0

log = logging.getLogger("megl_ray.storage")


def keep(data_dir: Path) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = EmbeddedS3(data_dir, secret_key=os.environ.get(EMBEDDED_SECRET_ENV) or EMBEDDED_SECRET_KEY_DEFAULT)
    server.start()
    try:
        state = {"endpoint_url": server.endpoint_url, "keeper_pid": os.getpid(), "weed_pid": server.pid}
        temporary = data_dir / f"{STATE_FILE}.{os.getpid()}"
        temporary.write_text(json.dumps(state))
        temporary.replace(data_dir / STATE_FILE)  # users never read half a file
        while not stop.wait(POLL_S):
            if not server.running:
                log.error("the embedded S3 server exited unexpectedly")
                return 1
            with locked(data_dir):  # users join and leave under this lock: no one joins while it stops
                if not live_leases(data_dir):
                    log.info("no live user holds a lease (they crashed): stopping")
                    server.stop()
                    _forget(data_dir)
                    return 0
        return 0
    finally:
        server.stop()
        _forget(data_dir)


def _forget(data_dir: Path) -> None:
    path = data_dir / STATE_FILE
    try:
        if json.loads(path.read_text()).get("keeper_pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return keep(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
