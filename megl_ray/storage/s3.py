"""Reaching an S3-compatible endpoint: :class:`S3Options`, cached boto3 clients, pyarrow filesystems, and the
translation of botocore errors into one-line :class:`StorageError` s (with retries while an endpoint is down).

Credentials never appear in logs, exception messages or reprs.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
import botocore.exceptions
import pyarrow.fs as pafs
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)

from megl_ray.errors import redact_urls
from megl_ray.storage.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    NotFoundError,
    StorageError,
    UnreachableError,
)
from megl_ray.storage.uri import _local_path, is_s3, split_s3

log = logging.getLogger("megl_ray.storage")

DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 5.0
# Per socket read, not per request: large objects stream fine, a hung server is noticed within a minute.
READ_TIMEOUT_S = 60.0

# botocore logs signed request headers (access key id, session token) at DEBUG. A verbose run of any
# megl_ray command turns the root logger to DEBUG, so cap these libraries unless someone chose a level.
for _name in ("botocore", "boto3", "s3transfer", "urllib3"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)

# --------------------------------------------------------------------------------------------------- options

# Credentials from these sources do not expire, so a snapshot of them is as good as the source. Others
# (instance/container roles, SSO, assumed roles) are refreshed by the SDK, so we must not freeze them.
_STATIC_CREDENTIAL_METHODS = {"env", "explicit", "shared-credentials-file", "config-file", "boto-config"}


PROBE_MAX_ATTEMPTS = 3
"""Attempts of pyarrow's (the AWS C++ SDK's) standard retry strategy for a first contact (``pyarrow_filesystem(...,
probe=True)``): the strategy backs off exponentially up to 20 s between attempts, so ``max_attempts`` (10) holds a
refused connection ~90 s before any error; 3 take ~2 s, and the caller bounds further retries by
``S3Options.retry_seconds`` (``megl_ray.storage.retrying_fs``). Everything else keeps the 10 attempts, which carry
a filesystem Ray Train holds (checkpoints) across a storage server's restart."""


@dataclass
class S3Options:
    """Where and how to reach S3. Credentials are hidden from ``repr``.

    ``max_attempts`` goes to botocore's standard retry mode (which counts it as retries after the first try)
    and to pyarrow's ``AwsStandardS3RetryStrategy`` (but see ``PROBE_MAX_ATTEMPTS``); ``retry_seconds`` bounds the
    extra retries this module and ``retrying_fs`` add on top while an endpoint is down (a server restarting).
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
            options.retry_seconds = _retry_seconds(env["MEGL_S3_RETRY_SECONDS"])
        credentials = _resolve_credentials(options, from_env=True)
        if credentials is not None and getattr(credentials, "method", None) in _STATIC_CREDENTIAL_METHODS:
            frozen = credentials.get_frozen_credentials()
            options.access_key = frozen.access_key or None
            options.secret_key = frozen.secret_key or None
            options.session_token = frozen.token or None
        return options

    def describe(self) -> str:
        """Where these options point, for messages (never includes credentials, not even in the URL)."""
        return redact_urls(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region})"


def _retry_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise StorageError(f"MEGL_S3_RETRY_SECONDS must be a number of seconds >= 0, got {text!r}")
    return value


def _boto3_session(options: S3Options) -> Any:
    # A session given a profile ignores AWS_* credential variables; only name it when asked to.
    try:
        if options.access_key:
            return boto3.session.Session(region_name=options.region)
        return boto3.session.Session(profile_name=options.profile, region_name=options.region)
    except botocore.exceptions.ProfileNotFound:
        raise StorageError(f"AWS profile {options.profile!r} not found in the AWS config files") from None


def _resolve_credentials(options: S3Options, *, from_env: bool = False) -> Any:
    """botocore credentials for ``options`` from the usual chain, or None when there are none."""
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


def pyarrow_filesystem(
    uri: str, options: S3Options | None = None, *, embed_credentials: bool = True, probe: bool = False
) -> tuple[Any, str]:
    """``(filesystem, path)`` for pyarrow (and Ray's ``storage_filesystem``).

    A local path gives ``(LocalFileSystem, absolute path)``; ``s3://b/k`` gives ``(S3FileSystem, "b/k")`` —
    without the scheme, because Ray rejects ``s3://`` paths combined with an explicit filesystem.
    ``probe=True``: a first contact that should fail in seconds when the endpoint is wrong (``PROBE_MAX_ATTEMPTS``).
    ``embed_credentials=False``: when the credentials are this process's ``AWS_*`` variables, leave them out of the
    filesystem (a pickled S3FileSystem carries its explicit keys): the AWS SDK reads them from the environment of
    whichever process uses it (a Ray worker, a Tune trial), and nothing Ray stores holds them.
    """
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(_local_path(uri).resolve())
    bucket, key = split_s3(uri)
    options = options or S3Options.from_env()
    kwargs: dict[str, Any] = {
        "region": options.region,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=PROBE_MAX_ATTEMPTS if probe else options.max_attempts
        ),
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
    from_env = (
        os.environ.get("AWS_ACCESS_KEY_ID") == access_key and os.environ.get("AWS_SECRET_ACCESS_KEY") == secret_key
    )
    if access_key and (embed_credentials or not from_env):
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
    return " ".join(redact_urls(text).split())


def _client_error_of(err: BaseException) -> Any:
    """The botocore ClientError behind ``err`` (s3transfer and boto3 wrap it), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ClientError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _is_transient(err: BaseException) -> bool:
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
    # Boto3Error covers boto3's transfer failures too (S3TransferFailedError, S3UploadFailedError)
    return isinstance(err, (BotoCoreError, ClientError, Boto3Error))


def _storage_error(err: BaseException, uri: str, options: S3Options) -> StorageError:
    """One clear line for what went wrong at ``uri``."""
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
            log.warning(
                "%s %s: S3 endpoint %s not answering (%s); retrying in %.1fs",
                what,
                uri,
                options.describe(),
                type(err).__name__,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
