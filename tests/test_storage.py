"""megl_ray.storage: URI parsing, options, local paths, and the real embedded SeaweedFS server (marked slow)."""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megl_ray import storage
from megl_ray.errors import UserError
from megl_ray.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    EmbeddedS3,
    EmbeddedServerError,
    InvalidURIError,
    NotFoundError,
    S3Options,
    StorageError,
    UnreachableError,
)

REPO = Path(__file__).resolve().parents[1]

# Distinctive fake credentials: any occurrence in a message, repr or log line is a leak.
LEAK_ACCESS = "AKIALEAKCHECK7Q2Z9XW"
LEAK_SECRET = "leak-secret-5b1f0c9e-do-not-print"
LEAK_TOKEN = "leak-token-8d3a77e1-do-not-print"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return False
    except OSError:
        return True


# ------------------------------------------------------------------------------------------- no server


def test_is_s3_and_split():
    assert storage.is_s3("s3://bucket/key")
    assert storage.is_s3("S3://bucket")
    assert not storage.is_s3("/data/s3://x")
    assert not storage.is_s3("bucket/key")
    assert not storage.is_s3(None)
    assert storage.split_s3("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.split_s3("s3://bucket/") == ("bucket", "")
    assert storage.split_s3("s3://my.bucket-1/dir/") == ("my.bucket-1", "dir/")


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "s3://a b/k", "s3://ab/k", "bucket/key", "gs://bucket/key"])
def test_split_s3_rejects_bad_uris(uri):
    with pytest.raises(InvalidURIError) as info:
        storage.split_s3(uri)
    assert isinstance(info.value, UserError)
    assert uri in str(info.value) and "\n" not in str(info.value)


def test_empty_bucket_message_is_clear():
    with pytest.raises(InvalidURIError, match="no bucket name"):
        storage.split_s3("s3://")


def test_options_repr_hides_credentials():
    options = S3Options(endpoint_url="http://127.0.0.1:1", access_key=LEAK_ACCESS, secret_key=LEAK_SECRET,
                        session_token=LEAK_TOKEN)
    for text in (repr(options), str(options), options.describe()):
        assert LEAK_ACCESS not in text and LEAK_SECRET not in text and LEAK_TOKEN not in text
    assert "127.0.0.1:1" in repr(options)


@pytest.fixture
def clean_aws_env(monkeypatch, tmp_path):
    """No AWS settings from this machine: only what a test sets."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("MEGL_S3"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_options_from_env(clean_aws_env):
    env = clean_aws_env
    options = S3Options.from_env()
    assert options.endpoint_url is None and options.region == "us-east-1" and options.access_key is None

    env.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    env.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    env.setenv("AWS_ACCESS_KEY_ID", LEAK_ACCESS)
    env.setenv("AWS_SECRET_ACCESS_KEY", LEAK_SECRET)
    options = S3Options.from_env()
    assert options.endpoint_url == "http://s3-specific:2"
    assert options.region == "eu-west-3"
    assert (options.access_key, options.secret_key, options.session_token) == (LEAK_ACCESS, LEAK_SECRET, None)

    env.setenv("MEGL_S3_ENDPOINT", "http://megl:3")
    env.setenv("AWS_REGION", "ap-south-1")
    env.setenv("AWS_SESSION_TOKEN", LEAK_TOKEN)
    options = S3Options.from_env()
    assert (options.endpoint_url, options.region, options.session_token) == ("http://megl:3", "ap-south-1", LEAK_TOKEN)


def test_options_from_env_profile(clean_aws_env, tmp_path):
    (tmp_path / "credentials").write_text(
        f"[dev]\naws_access_key_id = {LEAK_ACCESS}\naws_secret_access_key = {LEAK_SECRET}\n"
    )
    clean_aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    clean_aws_env.setenv("AWS_PROFILE", "dev")
    options = S3Options.from_env()
    assert options.profile == "dev" and options.access_key == LEAK_ACCESS and options.secret_key == LEAK_SECRET

    clean_aws_env.setenv("AWS_PROFILE", "missing")
    with pytest.raises(StorageError, match="profile 'missing'"):
        S3Options.from_env()


def test_boto3_client_config():
    options = S3Options(endpoint_url="http://127.0.0.1:9", access_key="a" * 8, secret_key="b" * 8)
    client = storage.boto3_client(options)
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    # botocore reads "max_attempts" as retries after the first try: 11 requests in all.
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 11}
    assert client.meta.config.s3 == {"addressing_style": "path"}
    assert client.meta.config.connect_timeout <= 10 and client.meta.config.read_timeout <= 120
    assert storage.boto3_client(options) is client


def test_pyarrow_filesystem_paths(tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage.pyarrow_filesystem(str(tmp_path / "x"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str((tmp_path / "x").resolve())
    options = S3Options(endpoint_url="http://127.0.0.1:9", access_key=LEAK_ACCESS, secret_key=LEAK_SECRET)
    fs, path = storage.pyarrow_filesystem("s3://bucket/runs/", options)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/runs"
    assert LEAK_SECRET not in repr(fs)
    assert storage.pyarrow_filesystem("s3://bucket", options)[1] == "bucket"


def test_local_paths(tmp_path):
    """Every operation also takes local paths, so callers need not branch."""
    src = tmp_path / "src"
    storage.write_bytes(str(src / "a" / "one.bin"), b"1")
    storage.write_bytes(str(src / "two.bin"), b"22")
    assert storage.read_bytes(str(src / "two.bin")) == b"22"
    assert storage.exists(str(src / "a")) and not storage.exists(str(src / "none"))
    assert storage.list_files(str(src)) == [str(src / "a" / "one.bin"), str(src / "two.bin")]
    assert storage.local_copy(str(src)) == src
    copied = storage.download(str(src), tmp_path / "dl")
    assert (copied / "a" / "one.bin").read_bytes() == b"1"
    storage.upload(src / "two.bin", str(tmp_path / "up") + "/")
    assert (tmp_path / "up" / "two.bin").read_bytes() == b"22"
    with pytest.raises(NotFoundError, match="none"):
        storage.read_bytes(str(src / "none"))


def test_unreachable_endpoint_is_a_clear_error_not_a_hang():
    port = _free_port()
    options = S3Options(endpoint_url=f"http://127.0.0.1:{port}", access_key=LEAK_ACCESS, secret_key=LEAK_SECRET,
                        max_attempts=2, retry_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        storage.read_bytes("s3://bucket/key", options)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "s3://bucket/key" in message and f"127.0.0.1:{port}" in message and "\n" not in message
    assert LEAK_SECRET not in message and LEAK_ACCESS not in message


# ------------------------------------------------------------------------------------ embedded server


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_round_trip(embedded_s3, tmp_path):
    options = embedded_s3.options
    storage.ensure_bucket("s3://t-roundtrip", options)
    storage.ensure_bucket("s3://t-roundtrip/any/key", options)  # already there: no error

    storage.write_bytes("s3://t-roundtrip/runs/a.txt", b"alpha", options)
    storage.write_bytes("s3://t-roundtrip/runs/sub/b.bin", bytes(range(256)) * 4096, options)  # 1 MiB
    storage.write_bytes("s3://t-roundtrip/runs2/c.txt", b"not under runs/", options)
    assert storage.read_bytes("s3://t-roundtrip/runs/a.txt", options) == b"alpha"
    assert storage.read_bytes("s3://t-roundtrip/runs/sub/b.bin", options) == bytes(range(256)) * 4096

    assert storage.list_files("s3://t-roundtrip/runs", options) == [
        "s3://t-roundtrip/runs/a.txt",
        "s3://t-roundtrip/runs/sub/b.bin",
    ]
    assert storage.list_files("s3://t-roundtrip/runs/", options) == storage.list_files("s3://t-roundtrip/runs", options)
    assert storage.list_files("s3://t-roundtrip/runs/a.txt", options) == ["s3://t-roundtrip/runs/a.txt"]
    assert len(storage.list_files("s3://t-roundtrip", options)) == 3
    assert storage.list_files("s3://t-roundtrip/nothing", options) == []

    assert storage.exists("s3://t-roundtrip/runs/a.txt", options)
    assert storage.exists("s3://t-roundtrip/runs", options)  # a prefix counts as a directory
    assert not storage.exists("s3://t-roundtrip/run", options)
    assert not storage.exists("s3://t-roundtrip/runs/missing.txt", options)
    assert storage.exists("s3://t-roundtrip", options) and not storage.exists("s3://t-no-such-bucket", options)

    single = storage.download("s3://t-roundtrip/runs/a.txt", tmp_path / "one", options)
    assert single == (tmp_path / "one" / "a.txt").resolve() and single.read_bytes() == b"alpha"
    tree = storage.download("s3://t-roundtrip/runs", tmp_path / "tree", options)
    assert (tree / "a.txt").read_bytes() == b"alpha" and (tree / "sub" / "b.bin").stat().st_size == 1 << 20
    assert not (tree / "c.txt").exists()

    local = tmp_path / "model"
    (local / "tokenizer").mkdir(parents=True)
    (local / "config.json").write_text('{"dim": 4}')
    (local / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    storage.upload(local, "s3://t-roundtrip/models/m1", options)
    storage.upload(local / "config.json", "s3://t-roundtrip/single/", options)
    storage.upload(local / "config.json", "s3://t-roundtrip/single/renamed.json", options)
    assert storage.list_files("s3://t-roundtrip/models/m1", options) == [
        "s3://t-roundtrip/models/m1/config.json",
        "s3://t-roundtrip/models/m1/tokenizer/vocab.txt",
    ]
    assert storage.list_files("s3://t-roundtrip/single", options) == [
        "s3://t-roundtrip/single/config.json",
        "s3://t-roundtrip/single/renamed.json",
    ]

    cache = tmp_path / "cache"
    copy = storage.local_copy("s3://t-roundtrip/models/m1", cache_dir=cache, options=options)
    assert copy == (cache / "t-roundtrip" / "models" / "m1").resolve()
    assert (copy / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    storage.write_bytes("s3://t-roundtrip/models/m1/config.json", b"changed", options)
    assert storage.local_copy("s3://t-roundtrip/models/m1", cache_dir=cache, options=options) == copy
    assert (copy / "config.json").read_text() == '{"dim": 4}'  # reused, not downloaded again
    one = storage.local_copy("s3://t-roundtrip/runs/a.txt", cache_dir=cache, options=options)
    assert one.is_file() and one.read_bytes() == b"alpha"
    assert not list(cache.rglob(".*partial*"))


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_pyarrow_parquet_on_embedded(embedded_s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    options = embedded_s3.options
    storage.ensure_bucket("s3://t-parquet", options)
    fs, base = storage.pyarrow_filesystem("s3://t-parquet/tables/", options)
    assert base == "t-parquet/tables"
    table = pa.table({"id": list(range(1000)), "name": [f"row{i}" for i in range(1000)]})
    pq.write_table(table, f"{base}/part-0.parquet", filesystem=fs)
    assert pq.read_table(f"{base}/part-0.parquet", filesystem=fs).equals(table)
    assert storage.list_files("s3://t-parquet/tables", options) == ["s3://t-parquet/tables/part-0.parquet"]
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{base}/missing.parquet")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_missing_object_and_bucket(embedded_s3, tmp_path):
    options = embedded_s3.options
    storage.ensure_bucket("s3://t-missing", options)
    with pytest.raises(NotFoundError) as info:
        storage.read_bytes("s3://t-missing/no/such.txt", options)
    assert "s3://t-missing/no/such.txt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BucketNotFoundError) as info:
        storage.read_bytes("s3://t-no-such-bucket/x.txt", options)
    assert "s3://t-no-such-bucket/x.txt" in str(info.value) and "t-no-such-bucket" in str(info.value)
    with pytest.raises(BucketNotFoundError):
        storage.exists("s3://t-no-such-bucket/x.txt", options)
    with pytest.raises(BucketNotFoundError):
        storage.list_files("s3://t-no-such-bucket/", options)
    with pytest.raises(BucketNotFoundError):
        storage.write_bytes("s3://t-no-such-bucket/x.txt", b"x", options)
    with pytest.raises(NotFoundError, match="s3://t-missing/nothing"):
        storage.download("s3://t-missing/nothing", tmp_path, options)
    with pytest.raises(NotFoundError):
        storage.local_copy("s3://t-missing/nothing", cache_dir=tmp_path / "cache", options=options)
    assert not (tmp_path / "cache" / "t-missing" / "nothing").exists()
    with pytest.raises(InvalidURIError):
        storage.read_bytes("s3://t-missing/dir/", options)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_credentials_never_leak(embedded_s3, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = S3Options(endpoint_url=embedded_s3.endpoint_url, access_key=LEAK_ACCESS, secret_key=LEAK_SECRET,
                      session_token=LEAK_TOKEN)
    errors = []
    for call in (
        lambda: storage.read_bytes("s3://t-leak/x.txt", wrong),
        lambda: storage.write_bytes("s3://t-leak/x.txt", b"x", wrong),
        lambda: storage.list_files("s3://t-leak/", wrong),
        lambda: storage.ensure_bucket("s3://t-leak", wrong),
    ):
        with pytest.raises(AccessDeniedError) as info:
            call()
        errors.append(info.value)

    # A right key id with a wrong secret is refused too (auth is on).
    half_right = S3Options(endpoint_url=embedded_s3.endpoint_url, access_key=embedded_s3.access_key,
                           secret_key=LEAK_SECRET)
    with pytest.raises(AccessDeniedError) as info:
        storage.read_bytes("s3://t-leak/x.txt", half_right)
    errors.append(info.value)

    real_secret = embedded_s3.options.secret_key
    texts = [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [caplog.text, repr(wrong), repr(embedded_s3), repr(embedded_s3.options), str(embedded_s3.options)]
    for text in texts:
        for secret in (LEAK_ACCESS, LEAK_SECRET, LEAK_TOKEN, real_secret):
            assert secret not in text
    assert all("s3://t-leak" in str(e) and "\n" not in str(e) for e in errors)
    assert real_secret not in embedded_s3.log_path.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_embedded_env_points_from_env_at_server(embedded_s3, clean_aws_env):
    for name, value in embedded_s3.env().items():
        clean_aws_env.setenv(name, value)
    options = S3Options.from_env()
    assert options.endpoint_url == embedded_s3.endpoint_url
    assert (options.access_key, options.secret_key, options.session_token) == (
        embedded_s3.access_key, embedded_s3.options.secret_key, None)
    storage.ensure_bucket("s3://t-env")
    storage.write_bytes("s3://t-env/k", b"via env")
    assert storage.read_bytes("s3://t-env/k") == b"via env"


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
    while not _port_closed(server._ports["s3"]):
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
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "orphan")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        pid_text, running = _read_line(parent.stdout, 45).split()
        weed_pid = int(pid_text)
        assert running == "True"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not _process_gone(weed_pid):
        assert time.monotonic() < deadline, f"weed {weed_pid} outlived its parent"
        time.sleep(0.1)


def test_only_stale_sockets_count_as_stale(tmp_path):
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    assert not storage._socket_is_stale(path)
    listener.close()
    assert storage._socket_is_stale(path)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fixed_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=str(port)):
            EmbeddedS3(tmp_path / "busy", port=port).start()


def _read_line(stream, timeout: float) -> str:
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


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_serve_cli(tmp_path):
    data_dir = tmp_path / "served"
    env = {**os.environ, "PYTHONPATH": str(REPO), storage.EMBEDDED_SECRET_ENV: LEAK_SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megl_ray.storage", "serve", "--data-dir", str(data_dir)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        info = json.loads(_read_line(proc.stdout, 45))
        assert set(info) == {"endpoint_url", "data_dir", "access_key"}
        assert info["data_dir"] == str(data_dir.resolve()) and info["access_key"] == "megl"
        options = S3Options(endpoint_url=info["endpoint_url"], access_key="megl", secret_key=LEAK_SECRET)
        storage.ensure_bucket("s3://t-serve", options)
        storage.write_bytes("s3://t-serve/x", b"served", options)
        assert storage.read_bytes("s3://t-serve/x", options) == b"served"
        weed_pid = int((data_dir / "weed.pid").read_text())

        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["stopped"] is True and result["signal"] == "SIGTERM"
    assert LEAK_SECRET not in stdout.decode() and LEAK_SECRET not in stderr.decode()
    assert not Path(f"/proc/{weed_pid}").exists()  # weed was reaped, not orphaned
    assert not (data_dir / "weed.pid").exists()


def test_serve_help_names_the_secret_variable(capsys):
    with pytest.raises(SystemExit) as info:
        storage.main(["serve", "--help"])
    assert info.value.code == 0
    assert storage.EMBEDDED_SECRET_ENV in " ".join(capsys.readouterr().out.split())
