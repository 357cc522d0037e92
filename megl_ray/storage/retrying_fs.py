"""A pyarrow filesystem that retries transient storage errors for a bounded time.

pyarrow's S3 retry strategy backs off for well under a second in total, and Ray Data does not retry the file listing
it runs at the start of every read. An S3-compatible server that restarts (a SeaweedFS or MinIO pod being
rescheduled, a node reboot) refuses connections for several seconds, which would fail a whole training epoch. This
wrapper retries connection-level failures with exponential backoff up to ``deadline_s`` and then raises a clear
one-line error; anything else (missing file, access denied) is raised at once. Whole files are read on open, so a
connection lost mid-read is retried too (Parquet shards are read whole by Ray Data anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION",
    "Connection refused",
    "connection reset",
    "Couldn't connect",
    "Timeout was reached",
    "SERVICE_UNAVAILABLE",
    "HTTP status 503",
    "SLOW_DOWN",
    "INTERNAL_FAILURE",
    "Broken pipe",
    "Connection was reset",
    "curlCode: 7",
)


class StorageUnavailableError(OSError):
    """Storage stayed unreachable for the whole retry deadline."""


def is_transient(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, (ConnectionError, TimeoutError)) or any(m.lower() in text.lower() for m in TRANSIENT_MARKERS)


class RetryingHandler(pafs.FileSystemHandler):
    """Delegates to ``base`` (any pyarrow filesystem), retrying transient errors until ``deadline_s`` passes."""

    def __init__(self, base: pafs.FileSystem, deadline_s: float = 120.0, first_delay_s: float = 0.2):
        self.base = base
        self.deadline_s = deadline_s
        self.first_delay_s = first_delay_s

    def __reduce__(self):  # Ray ships the filesystem to every read task
        return RetryingHandler, (self.base, self.deadline_s, self.first_delay_s)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        delay = self.first_delay_s
        while True:
            try:
                return fn()
            except OSError as err:
                elapsed = time.monotonic() - start
                if not is_transient(err):
                    raise
                if elapsed + delay > self.deadline_s:
                    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
                    raise StorageUnavailableError(
                        f"storage unreachable for {elapsed:.0f}s while trying to {what}: {first_line}"
                    ) from None
                log.warning("storage unreachable (%s), retrying %s in %.1fs", type(err).__name__, what, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- read side: retried -------------------------------------------------------------------------------------

    def get_type_name(self) -> str:
        return f"retrying+{self.base.type_name}"

    def equals(self, other: Any) -> bool:
        return isinstance(other, RetryingHandler) and self.base.equals(other.base)

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry(f"stat {paths[0] if paths else ''}", lambda: self.base.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry(f"list {selector.base_dir}", lambda: self.base.get_file_info(selector))

    def open_input_file(self, path: str):
        return self._retry(f"read {path}", lambda: pa.BufferReader(self._read_all(path)))

    def open_input_stream(self, path: str):
        return self._retry(f"read {path}", lambda: pa.BufferReader(self._read_all(path)))

    def _read_all(self, path: str) -> pa.Buffer:
        with self.base.open_input_stream(path) as f:
            return f.read_buffer()

    # -- write side: passed through (writes are not idempotent in general; callers decide) ----------------------

    def create_dir(self, path, recursive):
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.base.delete_file(path)

    def move(self, src, dest):
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self.base.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.base.open_append_stream(path, metadata=metadata)


def retrying(fs: pafs.FileSystem, deadline_s: float = 120.0) -> pafs.FileSystem:
    """``fs`` wrapped so that reads survive a storage outage of up to ``deadline_s`` seconds."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fs  # nothing transient to retry on a local disk
    return pafs.PyFileSystem(RetryingHandler(fs, deadline_s))
