"""megl_ray.storage.embedded: the real SeaweedFS server — restarts, crashes, timeouts, dying with its parent."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megl_ray import storage
from megl_ray.storage import EmbeddedS3, EmbeddedServerError
from tests.support.storage_support import REPO, port_closed, read_line


# A server this module may restart without disturbing the session-wide one.
@pytest.fixture(scope="module")
def restartable_s3(tmp_path_factory):
    server = EmbeddedS3(tmp_path_factory.mktemp("restartable_s3"))
    server.start()
    storage.ensure_bucket("s3://t-restart", server.options)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_restart_keeps_objects(restartable_s3):
    server, options = restartable_s3, restartable_s3.options
    payloads = {f"s3://t-restart/keep/{i}.bin": os.urandom(1000 + i * 70_000) for i in range(5)}
    for uri, data in payloads.items():
        storage.write_bytes(uri, data, options)
    endpoint, old_pid = server.endpoint_url, server.pid
    server.restart()
    assert server.endpoint_url == endpoint and server.pid != old_pid and server.running
    for uri, data in payloads.items():
        assert storage.read_bytes(uri, options) == data
    # New writes after a restart must not reuse the ids of old ones.
    storage.write_bytes("s3://t-restart/keep/new.bin", b"new", options)
    for uri, data in payloads.items():
        assert storage.read_bytes(uri, options) == data
    assert len(storage.list_files("s3://t-restart/keep", options)) == 6


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", ["boto3", "pyarrow"])
def test_read_survives_restart(restartable_s3, reader):
    server, options = restartable_s3, restartable_s3.options
    data = os.urandom(300_000)
    uri = f"s3://t-restart/during/{reader}.bin"
    storage.write_bytes(uri, data, options)
    fs, path = storage.pyarrow_filesystem(uri, options)

    restarter = threading.Thread(target=server.restart, daemon=True)
    restarter.start()
    deadline = time.monotonic() + 10
    while not port_closed(server._ports["s3"]):
        assert time.monotonic() < deadline, "server did not go down"
        time.sleep(0.02)

    started = time.monotonic()
    if reader == "boto3":
        got = storage.read_bytes(uri, options)
    else:
        with fs.open_input_stream(path) as stream:
            got = stream.read()
    waited = time.monotonic() - started
    restarter.join(30)
    assert got == data
    assert not restarter.is_alive() and server.running
    logging.getLogger(__name__).info("read issued while down completed after %.1fs", waited)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_start_over_leftovers_of_a_crashed_run(tmp_path):
    data_dir = tmp_path / "crashy"
    first = EmbeddedS3(data_dir).start()
    try:
        storage.ensure_bucket("s3://t-crash", first.options)
        storage.write_bytes("s3://t-crash/kept.txt", b"survives a crash", first.options)
        # While it runs, the data dir is taken.
        with pytest.raises(EmbeddedServerError, match="in use"):
            EmbeddedS3(data_dir).start()
        # Crash: weed dies without cleanup; pid file, sockets and store locks stay behind.
        os.kill(first.pid, signal.SIGKILL)
        first._process.wait(10)
        assert (data_dir / "weed.pid").exists()
        (data_dir / "stray-file.txt").write_text("left by someone")

        second = EmbeddedS3(data_dir).start()
        try:
            assert second.endpoint_url != first.endpoint_url or second.pid != first.pid
            assert storage.read_bytes("s3://t-crash/kept.txt", second.options) == b"survives a crash"
        finally:
            second.stop()
            second.stop()  # twice is fine
        assert not second.running and not (data_dir / "weed.pid").exists()
    finally:
        first.stop()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_startup_timeout_reports_log_tail(tmp_path):
    server = EmbeddedS3(tmp_path / "slow", startup_timeout=0.05)
    with pytest.raises(EmbeddedServerError) as info:
        server.start()
    message = str(info.value)
    assert "did not answer" in message and "weed.log" in message and "megl_ray.storage: starting" in message
    assert not server.running and server.pid is None


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_interrupted_start_leaves_no_process(tmp_path, monkeypatch):
    server = EmbeddedS3(tmp_path / "interrupted")
    seen = []

    def interrupted(self):
        seen.append(self.pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(EmbeddedS3, "_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert seen and seen[0] is not None
    assert not server.running and not Path(f"/proc/{seen[0]}").exists()


def _process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_weed_dies_with_its_python_parent(tmp_path):
    code = (
        "import sys, threading, time\n"
        "from megl_ray.storage import EmbeddedS3\n"
        "box = []\n"
        "# started from a short-lived thread: weed must outlive the thread but not the process\n"
        "t = threading.Thread(target=lambda: box.append(EmbeddedS3(sys.argv[1]).start())); t.start(); t.join()\n"
        "time.sleep(1.5)\n"
        "print(box[0].pid, box[0].running, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "orphan")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid_text, running = read_line(parent.stdout, 45).split()
        weed_pid = int(pid_text)
        assert running == "True"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not _process_gone(weed_pid):
        assert time.monotonic() < deadline, f"weed {weed_pid} outlived its parent"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fixed_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=str(port)):
            EmbeddedS3(tmp_path / "busy", port=port).start()
