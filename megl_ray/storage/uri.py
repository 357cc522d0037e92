"""``s3://bucket/key`` URIs and local paths: every storage function accepts either, so callers need not branch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megl_ray.storage.errors import InvalidURIError, StorageError


def is_s3(uri: Any) -> bool:
    """Whether ``uri`` is an ``s3://`` URI (anything else is treated as a local path)."""
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def run_uri(storage_path: str, name: str) -> str:
    """The directory of run (or sweep) ``name`` under ``storage_path`` (local or ``s3://``)."""
    return storage_path.rstrip("/") + "/" + name


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``; the key may be empty (the bucket itself)."""
    if not is_s3(uri):
        raise InvalidURIError(f"{uri!r} is not an s3:// URI (expected s3://bucket/key)")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidURIError(f"{uri!r} has no bucket name (expected s3://bucket/key)")
    # Lenient on purpose (old AWS buckets may hold capitals or '_'), strict on what can never be a bucket.
    if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in ".-_" for c in bucket) or not bucket.isascii():
        raise InvalidURIError(f"{uri!r}: {bucket!r} is not a valid bucket name (3-63 letters, digits, '.', '-')")
    return bucket, key


def _local_path(uri: str | os.PathLike[str]) -> Path:
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise InvalidURIError(f"{text!r}: unsupported scheme (use s3://bucket/key or a local path)")
    return Path(text).expanduser()


def _join(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _dir_prefix(key: str) -> str:
    """The listing prefix of a "directory" key: ``a/b`` and ``a/b/`` both list ``a/b/...``, never ``a/bc``."""
    return key if not key or key.endswith("/") else key + "/"


def _safe_target(root: Path, relative: str, uri: str) -> Path:
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise StorageError(f"{uri}: key {relative!r} would land outside {root}; refusing to download it")
    return target
