"""One embedded store shared by every local process of one ``$MEGL_HOME``: two runs, a run and an ``evaluate``, a
sweep and ``megl storage`` use the same SeaweedFS server side by side.

The first process that needs the store starts a *keeper* (``python -m megl_ray.storage.keeper DATA_DIR``: the
server's parent, in a session of its own, so the store outlives the process that happened to start it); every user
holds a lease (a file named by its pid under ``DATA_DIR/leases``) for as long as it uses the store. The last user to
leave stops the keeper and waits for it, so a command that returns leaves no server behind, as before; a user that
crashes (SIGKILL, OOM) leaves a lease whose pid is gone, which the keeper reclaims, and a keeper left without live
users stops by itself. Joining and leaving happen under an ``flock`` on ``DATA_DIR/store.lock`` (released by the
kernel if its holder dies: a stale lock needs no recovery); a ``store.json`` whose keeper is gone is replaced. The
secret is every user's own ``$MEGL_S3_SECRET_KEY`` (or the development default), never written here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megl_ray.storage.embedded import EMBEDDED_ACCESS_KEY, server_env, server_options
from megl_ray.storage.errors import EmbeddedServerError
from megl_ray.storage.s3 import S3Options
from megl_ray.storage.weed import _tail

log = logging.getLogger("megl_ray.storage")

LOCK_FILE = "store.lock"
STATE_FILE = "store.json"
LEASES_DIR = "leases"
KEEPER_LOG = "keeper.log"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # keepers started here, reaped when polled


@dataclass(frozen=True)
class SharedStore:
    """What a user of the shared store needs: its endpoint and the credentials of this process."""

    endpoint_url: str
    secret_key: str
    access_key: str = EMBEDDED_ACCESS_KEY

    @property
    def options(self) -> S3Options:
        return server_options(self.endpoint_url, self.access_key, self.secret_key)

    def env(self) -> dict[str, str]:
        """The variables that make ``S3Options.from_env`` (and other AWS tools, the local Ray's workers) use it."""
        return server_env(self.endpoint_url, self.access_key, self.secret_key)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; a keeper this process started is reaped here)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@contextlib.contextmanager
def locked(data_dir: Path, name: str = LOCK_FILE) -> Iterator[None]:
    """The store's lock, or another lock file ``name`` beside it (an ``flock``: the kernel releases it when its
    holder dies)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / name, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def live_leases(data_dir: Path) -> list[Path]:
    """The leases of running users; those of users that are gone are removed (the caller holds the lock)."""
    live = []
    for lease in sorted((data_dir / LEASES_DIR).glob("*")):
        try:
            pid = int(lease.name.split("-")[0])
        except ValueError:
            pid = -1
        if pid > 0 and alive(pid):
            live.append(lease)
        else:
            lease.unlink(missing_ok=True)
    return live


def read_state(data_dir: Path) -> dict | None:
    """``store.json`` when its keeper runs (None otherwise: no store, or a stale file of a dead keeper)."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and alive(int(state.get("keeper_pid", -1))) else None


def _start_keeper(data_dir: Path) -> dict:
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    with open(data_dir / KEEPER_LOG, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "megl_ray.storage.keeper", str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # not in this process's group: a Ctrl-C here must not stop other users' store
        )
    _CHILDREN[process.pid] = process
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state = read_state(data_dir)
        if state is not None and state.get("keeper_pid") == process.pid:
            return state
        if process.poll() is not None:
            break
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        process.kill()
    raise EmbeddedServerError(
        f"the embedded store's keeper did not start; last lines of {data_dir / KEEPER_LOG}:\n"
        f"{_tail(data_dir / KEEPER_LOG)}"
    )


def _stop_keeper(data_dir: Path, pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        log.warning("the embedded store's keeper (pid %d) did not stop in %.0f s; killing it", pid, STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.05)
    (data_dir / STATE_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def shared_store(data_dir: Path, secret_key: str) -> Iterator[SharedStore]:
    """Use the store of ``data_dir`` for the duration: join the running one, or start it; the last user out stops
    it."""
    lease = data_dir / LEASES_DIR / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with locked(data_dir):
        lease.parent.mkdir(exist_ok=True)
        lease.write_text("")
        try:
            state = read_state(data_dir)
            if state is None:
                state = _start_keeper(data_dir)
                log.info("embedded S3 serving %s from %s", state["endpoint_url"], data_dir)
            else:
                log.info("embedded S3 at %s joined (shared with %d other users)", state["endpoint_url"],
                         len(live_leases(data_dir)) - 1)  # fmt: skip
        except BaseException:
            lease.unlink(missing_ok=True)
            raise
    try:
        yield SharedStore(state["endpoint_url"], secret_key)
    finally:
        with locked(data_dir):
            lease.unlink(missing_ok=True)
            current = read_state(data_dir)
            if current is not None and not live_leases(data_dir):
                _stop_keeper(data_dir, int(current["keeper_pid"]))
                log.info("embedded S3 at %s stopped (its last user left)", current["endpoint_url"])
