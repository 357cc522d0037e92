"""Reading, writing, listing, uploading and downloading objects (or local files), with errors as
:class:`StorageError` s and retries while the endpoint is down (see :func:`megl_ray.storage.s3._call`)."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import botocore.exceptions

from megl_ray.config import megl_home, safe_io
from megl_ray.storage.errors import BucketNotFoundError, InvalidURIError, NotFoundError, StorageError
from megl_ray.storage.s3 import S3Options, _call, boto3_client
from megl_ray.storage.uri import _dir_prefix, _join, _local_path, _safe_target, is_s3, split_s3

log = logging.getLogger("megl_ray.storage")

CACHE_DIR_VAR = "MEGL_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where ``s3://`` copies are cached: ``$MEGL_CACHE_DIR``, else ``$MEGL_HOME/cache/s3``."""
    if os.environ.get(CACHE_DIR_VAR):
        return Path(os.environ[CACHE_DIR_VAR]).expanduser()
    return megl_home() / "cache" / "s3"


LOCAL_READ_LIMIT = 64 * 1024**3
"""Largest local file ``read_bytes`` reads whole (checked before reading)."""


def _need_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise InvalidURIError(f"{uri!r} names a prefix, not an object")
    return bucket, key


def read_bytes(uri: str, options: S3Options | None = None) -> bytes:
    """The whole content of an object (or local file)."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.exists():
            raise NotFoundError(f"{uri}: no such file")
        return safe_io.read_bytes(path, LOCAL_READ_LIMIT, "file")  # a FIFO would block, a device never end
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
        if path.is_dir():
            raise StorageError(f"cannot write {uri}: it is a directory")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never leave the temporary file behind
            raise
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


def download(
    uri: str,
    local_dir: str | os.PathLike[str],
    options: S3Options | None = None,
    patterns: Sequence[str] | None = None,
) -> Path:
    """Download one object into ``local_dir`` (returns the file's path) or everything under a prefix into
    ``local_dir`` keeping relative paths, like ``aws s3 cp --recursive`` (returns ``local_dir``); with
    ``patterns`` (``fnmatch`` globs on the relative path, as ``huggingface_hub``'s ``allow_patterns``) only the
    files matching one."""
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
    if patterns is not None:
        keys = [k for k in keys if matches(k[len(prefix) :], patterns)]
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


def _remote_state(bucket: str, key: str, uri: str, options: S3Options) -> dict[str, list[Any]]:
    """(ETag, size) of the object ``key``, or of every object under it as a prefix (one listing, no download)."""
    client = boto3_client(options)
    if key and not key.endswith("/"):
        try:
            head = _call("stat", uri, options, lambda: client.head_object(Bucket=bucket, Key=key))
            return {key: [head.get("ETag"), head.get("ContentLength")]}
        except BucketNotFoundError:
            raise
        except NotFoundError:
            pass

    def listing() -> dict[str, list[Any]]:
        state = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_dir_prefix(key)):
            for item in page.get("Contents", ()):
                if not item["Key"].endswith("/"):
                    state[item["Key"]] = [item.get("ETag"), item.get("Size")]
        return state

    return _call("list", uri, options, listing)


def local_copy(
    uri: str,
    cache_dir: str | os.PathLike[str] | None = None,
    options: S3Options | None = None,
    patterns: Sequence[str] | None = None,
) -> Path:
    """A local path for ``uri``: a local path as is; an ``s3://`` object or prefix downloaded to
    ``<cache_dir or default_cache_dir()>/<bucket>/<key>`` and reused from there while the bucket still holds the
    same objects (their ETags and sizes, one listing per call, are kept beside the copy): a model re-uploaded under
    the same prefix is fetched again. When the store cannot be reached, a cached copy is used as it is (a warning).
    With ``patterns`` only the matching files of a prefix are fetched, into a copy of their own
    (``<key>@files-<hash>``): the driver reads a 7B model's tokenizer and ``config.json`` without its 14 GB of weights.
    """
    if not is_s3(uri):
        return _local_path(uri)
    bucket, key = split_s3(uri)
    cache_root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().resolve()
    suffix = "" if patterns is None else "@files-" + hashlib.sha256("\0".join(patterns).encode()).hexdigest()[:12]
    target = _safe_target(cache_root, f"{bucket}/{key}".rstrip("/") + suffix, uri)
    manifest = target.parent / f".{target.name}.megl-objects.json"
    options = options or S3Options.from_env()
    try:
        remote = _remote_state(bucket, key, uri, options)
        if patterns is not None:
            prefix = _dir_prefix(key)
            remote = {k: v for k, v in remote.items() if matches(k[len(prefix) :], patterns)}
    except NotFoundError:
        raise
    except StorageError as err:
        if target.exists():
            log.warning("cannot check %s against the store (%s): using the cached copy %s", uri, err, target)
            return target
        raise
    if target.exists() and manifest.is_file() and json.loads(manifest.read_text()) == remote:
        log.debug("using cached copy %s of %s", target, uri)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename: an interrupted download is never mistaken for a complete copy,
    # and workers racing on one node each finish their own copy before the first rename wins.
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fetched = download(uri, staging, options, patterns)
        if target.exists():  # a stale copy (the objects changed, or a copy from before revalidation)
            log.info("%s changed in the store: fetching it again", uri)
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        try:
            os.rename(fetched, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.write_text(json.dumps(remote, sort_keys=True))
    log.info("cached %s at %s", uri, target)
    return target


def matches(relative: str, patterns: Sequence[str]) -> bool:
    """Whether a file's path relative to the copied prefix matches one of ``patterns`` (``fnmatch``: ``*`` spans
    ``/`` too, as in ``huggingface_hub``'s ``allow_patterns``)."""
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def cache_size(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, int, int]:
    """(the cache folder, its file count, its bytes)."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return root, len(files), sum(p.stat().st_size for p in files)


def clear_cache(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, int, int]:
    """Remove every cached copy; returns what was removed (as ``cache_size``)."""
    root, count, size = cache_size(cache_dir)
    shutil.rmtree(root, ignore_errors=True)
    return root, count, size
