"""S3-compatible storage (AWS S3, MinIO, Ceph, SeaweedFS) and an embedded SeaweedFS server.

Every function taking a ``uri`` accepts an ``s3://bucket/key`` URI or a local path, so callers need not branch.
Credentials come from :class:`S3Options` (by default :meth:`S3Options.from_env`, i.e. the usual AWS chain) and
never appear in logs, exception messages or reprs.

The package, by concern (read in this order):

- :mod:`~megl_ray.storage.uri` — ``s3://`` URIs and local paths;
- :mod:`~megl_ray.storage.errors` — the :class:`StorageError` family (each one line, exit 2 in a CLI);
- :mod:`~megl_ray.storage.s3` — :class:`S3Options`, boto3/pyarrow clients, error translation and retries;
- :mod:`~megl_ray.storage.transfer` — read/write/list/upload/download/``local_copy``;
- :mod:`~megl_ray.storage.embedded` (+ :mod:`~megl_ray.storage.weed`) — the embedded SeaweedFS server;
- :mod:`~megl_ray.storage.embedded_home` — the embedded store of ``$MEGL_HOME``, served again for any process;
- :mod:`~megl_ray.storage.retrying_fs` — a pyarrow filesystem that bridges storage outages;
- :mod:`~megl_ray.storage.serve` — ``python -m megl_ray.storage serve --data-dir DIR``.
"""

from __future__ import annotations

from megl_ray.storage.embedded import (
    EMBEDDED_ACCESS_KEY,
    EMBEDDED_SECRET_ENV,
    EMBEDDED_SECRET_KEY_DEFAULT,
    EmbeddedS3,
)
from megl_ray.storage.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EmbeddedServerError,
    InvalidURIError,
    NotFoundError,
    StorageError,
    UnreachableError,
)
from megl_ray.storage.s3 import (
    CONNECT_TIMEOUT_S,
    DEFAULT_REGION,
    READ_TIMEOUT_S,
    S3Options,
    boto3_client,
    pyarrow_filesystem,
)
from megl_ray.storage.serve import main
from megl_ray.storage.transfer import (
    cache_size,
    clear_cache,
    default_cache_dir,
    download,
    ensure_bucket,
    exists,
    list_files,
    local_copy,
    read_bytes,
    upload,
    write_bytes,
)
from megl_ray.storage.uri import is_s3, split_s3

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "CONNECT_TIMEOUT_S",
    "DEFAULT_REGION",
    "EMBEDDED_ACCESS_KEY",
    "cache_size",
    "clear_cache",
    "default_cache_dir",
    "EMBEDDED_SECRET_ENV",
    "EMBEDDED_SECRET_KEY_DEFAULT",
    "EmbeddedS3",
    "EmbeddedServerError",
    "InvalidURIError",
    "NotFoundError",
    "READ_TIMEOUT_S",
    "S3Options",
    "StorageError",
    "UnreachableError",
    "boto3_client",
    "download",
    "ensure_bucket",
    "exists",
    "is_s3",
    "list_files",
    "local_copy",
    "main",
    "pyarrow_filesystem",
    "read_bytes",
    "split_s3",
    "upload",
    "write_bytes",
]
