"""The embedded S3 server: one SeaweedFS process (master + volume + filer + S3 gateway) under a data dir.

``python -m megl_ray.storage serve --data-dir DIR`` runs it from a shell (see :mod:`megl_ray.storage.serve`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import subprocess
import threading
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import botocore.exceptions

from megl_ray.storage.errors import EmbeddedServerError
from megl_ray.storage.s3 import DEFAULT_REGION, S3Options, boto3_client
from megl_ray.storage.weed import (
    _GRPC_PORT_OFFSET,
    _die_with_parent,
    _has_data_node,
    _pick_ports,
    _pid_is_weed,
    _port_pair_free,
    _socket_is_stale,
    _tail,
    _weed_binary,
)

log = logging.getLogger("megl_ray.storage")

EMBEDDED_ACCESS_KEY = "megl"
EMBEDDED_SECRET_ENV = "MEGL_S3_SECRET_KEY"
# A well-known development secret: the embedded server binds 127.0.0.1 by default; set MEGL_S3_SECRET_KEY
# (or pass secret_key) when it listens anywhere else.
EMBEDDED_SECRET_KEY_DEFAULT = "megl-embedded-dev-secret"


def server_options(endpoint_url: str, access_key: str, secret_key: str) -> S3Options:
    """S3Options that reach an embedded server (this process's own, or a shared one)."""
    return S3Options(endpoint_url=endpoint_url, region=DEFAULT_REGION, access_key=access_key, secret_key=secret_key)


def server_env(endpoint_url: str, access_key: str, secret_key: str) -> dict[str, str]:
    """Environment variables that make ``S3Options.from_env`` (and other AWS tools) use an embedded server."""
    return {
        "MEGL_S3_ENDPOINT": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        # An inherited token belongs to other credentials; SeaweedFS would reject requests carrying it.
        "AWS_SESSION_TOKEN": "",
        "AWS_REGION": DEFAULT_REGION,
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
    }


_LIVE_SERVERS: weakref.WeakSet[EmbeddedS3] = weakref.WeakSet()

# Linux ties PR_SET_PDEATHSIG to the thread that forked, not the process: a server started from a short-lived
# thread would be killed when that thread ends. Spawning from one thread that lives as long as the process
# keeps "weed dies with its Python parent" without that surprise.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megl-weed-spawner")


class EmbeddedS3:
    """A single-process SeaweedFS (master + volume + filer + S3 gateway) on free ports, with S3 auth on.

    Everything lives under ``data_dir`` (volumes, metadata, ``s3.json``, ``weed.log``, ``weed.pid``), so
    restarting on the same ``data_dir`` keeps every object. Use as a context manager or call
    :meth:`start` / :meth:`stop`. ``port`` fixes the S3 port; the other ports are picked free on ``host``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str = EMBEDDED_ACCESS_KEY,
        secret_key: str = EMBEDDED_SECRET_KEY_DEFAULT,
        *,
        startup_timeout: float = 60.0,
        stop_timeout: float = 1.0,
        volume_size_limit_mb: int = 64,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.access_key = access_key
        self._secret_key = secret_key
        self.startup_timeout = startup_timeout
        # weed's filer waits 15 s for its own streaming gRPC subscribers on SIGTERM before exiting. Everything
        # it acknowledged is already written to its files by then, so waiting that long buys nothing; a second
        # lets the servers close their files themselves (every CLI and test that serves the store pays it).
        self.stop_timeout = stop_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self._fixed_port = port
        self._ports: dict[str, int] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    # -- addresses and credentials

    @property
    def log_path(self) -> Path:
        """The server's log file (appended across restarts)."""
        return self.data_dir / "weed.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "weed.pid"

    @property
    def endpoint_url(self) -> str | None:
        """``http://host:port`` of the S3 gateway, once started (kept across restarts)."""
        if self._ports is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._ports['s3']}"

    @property
    def options(self) -> S3Options:
        """S3Options that reach this server."""
        return server_options(self.endpoint_url or "", self.access_key, self._secret_key)

    def env(self) -> dict[str, str]:
        """Environment variables that make :meth:`S3Options.from_env` (and other AWS tools) use this server."""
        return server_env(self.endpoint_url or "", self.access_key, self._secret_key)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The weed process id while running."""
        return self._process.pid if self.running and self._process is not None else None

    def __repr__(self) -> str:
        return (
            f"EmbeddedS3(data_dir={str(self.data_dir)!r}, endpoint_url={self.endpoint_url!r}, running={self.running})"
        )

    # -- lifecycle

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> EmbeddedS3:
        """Start the server and wait until its S3 endpoint serves authenticated requests; no-op if running."""
        with self._lock:
            if self.running:
                return self
            self._prepare_data_dir()
            attempts = 1 if self._ports is not None or self._fixed_port is not None else 3
            for attempt in range(1, attempts + 1):
                if self._ports is None:
                    self._ports = self._choose_ports()
                else:
                    self._check_ports_still_free()
                try:
                    self._launch_and_wait()
                    break
                except _PortTaken as taken:
                    # Someone bound one of our free-picked ports between the check and weed's bind.
                    if attempt == attempts:
                        raise EmbeddedServerError(
                            f"embedded S3 could not bind its ports {sorted(self._ports.values())} on {self.host}; "
                            f"last lines of {self.log_path}:\n{taken}"
                        ) from None
                    self._ports = None
            _LIVE_SERVERS.add(self)
            log.info("embedded S3 serving %s from %s (pid %s)", self.endpoint_url, self.data_dir, self.pid)
            return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` (default ``stop_timeout``) s. Idempotent."""
        with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(self.stop_timeout if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    log.debug("weed (pid %d) still draining after SIGTERM; killing it", process.pid)
                    process.kill()
                    process.wait()
            with contextlib.suppress(OSError):
                if self.pid_path.read_text().strip() == str(process.pid):
                    self.pid_path.unlink()
            self._remove_sockets()
            _LIVE_SERVERS.discard(self)
            log.info("embedded S3 at %s stopped (exit %s)", self.endpoint_url, process.returncode)

    def restart(self) -> EmbeddedS3:
        """Stop and start again on the same ports and data dir (every object is kept)."""
        with self._lock:
            self.stop()
            return self.start()

    # -- internals

    def _choose_ports(self) -> dict[str, int]:
        if self._fixed_port is not None:
            if not _port_pair_free(self.host, self._fixed_port):
                raise EmbeddedServerError(
                    f"port {self._fixed_port} or its gRPC port {self._fixed_port + _GRPC_PORT_OFFSET} "
                    f"is in use on {self.host}"
                )
            others = _pick_ports(self.host, 3, taken=[self._fixed_port])
            return {"s3": self._fixed_port, "master": others[0], "volume": others[1], "filer": others[2]}
        s3, master, volume, filer = _pick_ports(self.host, 4)
        return {"s3": s3, "master": master, "volume": volume, "filer": filer}

    def _check_ports_still_free(self) -> None:
        """Before a restart on the same ports: fail clearly if someone took one meanwhile."""
        assert self._ports is not None
        for name, port in self._ports.items():
            if not _port_pair_free(self.host, port):
                raise EmbeddedServerError(
                    f"cannot restart embedded S3: its {name} port {port} (or gRPC port {port + _GRPC_PORT_OFFSET}) "
                    f"on {self.host} is now used by another process"
                )

    def _prepare_data_dir(self) -> None:
        for sub in ("", "volumes", "master"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        # A server whose Python parent was killed may still hold the dir; two would corrupt the filer store.
        with contextlib.suppress(OSError, ValueError):
            old_pid = int(self.pid_path.read_text().strip())
            if _pid_is_weed(old_pid):
                raise EmbeddedServerError(
                    f"data dir {self.data_dir} is in use by a running weed (pid {old_pid}); stop it or use another dir"
                )
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        config = {
            "identities": [
                {
                    "name": self.access_key,
                    "credentials": [{"accessKey": self.access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config_path = self.data_dir / "s3.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.chmod(config_path, 0o600)

    def _command(self) -> list[str]:
        assert self._ports is not None
        p = self._ports
        return [
            _weed_binary(),
            "-logtostderr",  # one log file under data_dir instead of weed.* files in /tmp
            "server",
            f"-dir={self.data_dir / 'volumes'}",
            f"-master.dir={self.data_dir / 'master'}",  # default is <dir>/m<port>: a new port would lose it
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            "-filer",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.data_dir / 's3.json'}",
            "-s3.iam=false",
            # Like AWS: a write to a missing bucket fails, so a typo'd bucket is caught here too, not in production.
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Raft waits this long for a leader on every restart with existing state; alone, it is leader anyway.
            "-master.electionTimeout=1s",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]

    def _launch_and_wait(self) -> None:
        command = self._command()
        self._remove_sockets()  # left by a crashed run on these (now verified free) ports
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"\n==== megl_ray.storage: starting {' '.join(command)}\n".encode())
            log_file.flush()
            # cwd=data_dir: weed reads filer.toml/security.toml from its working directory first.
            self._process = _SPAWNER.submit(
                subprocess.Popen,
                command,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches Python, which stops weed in order
                preexec_fn=_die_with_parent,
            ).result()
        try:
            self.pid_path.write_text(f"{self._process.pid}\n")
            self._wait_ready()
        except BaseException:
            # Whatever interrupts the wait (our timeout, Ctrl-C, a test's timeout) must not leave weed behind.
            self.stop(timeout=0)
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                tail = _tail(self.log_path)
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise EmbeddedServerError(
                    f"embedded S3 (weed) exited with status {code} while starting; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                tail = _tail(self.log_path)
                raise EmbeddedServerError(
                    f"embedded S3 did not answer at {self.endpoint_url} within {self.startup_timeout:g}s; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            time.sleep(0.1)

    def _ready(self) -> bool:
        """S3 answers signed requests and the master knows a volume server (else the first write fails)."""
        assert self._ports is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://{host}:{self._ports['master']}/dir/status", timeout=2) as response:
                status = json.load(response)
        except (OSError, ValueError):
            return False
        if not _has_data_node(status):
            return False
        probe = S3Options(
            endpoint_url=self.endpoint_url,
            access_key=self.access_key,
            secret_key=self._secret_key,
            max_attempts=1,
        )
        try:
            boto3_client(probe).list_buckets()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False
        return True

    def _remove_sockets(self) -> None:
        """Remove the /tmp/seaweedfs-*-<port>.sock files weed leaves behind after SIGKILL, if nobody listens.

        weed's own components talk through these sockets and do not fall back to TCP, so deleting a live one
        (say, of another server that took these ports meanwhile) would cut that server in pieces.
        """
        if self._ports is None:
            return
        ports = {str(port) for port in self._ports.values()}
        ports |= {str(port + _GRPC_PORT_OFFSET) for port in self._ports.values()}
        for directory in {"/tmp", os.environ.get("TMPDIR", "/tmp")}:
            with contextlib.suppress(OSError):
                for entry in os.scandir(directory):
                    name = entry.name
                    port = name[: -len(".sock")].rsplit("-", 1)[-1]
                    if name.startswith("seaweedfs-") and name.endswith(".sock") and port in ports:
                        if _socket_is_stale(entry.path):
                            with contextlib.suppress(OSError):
                                os.unlink(entry.path)


class _PortTaken(Exception):
    pass


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()
