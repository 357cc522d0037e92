"""The storage errors: each is a ``UserError`` (one line, exit 2 through ``megl_ray.cli.run_cli``) and also the
built-in exception a caller would expect (``FileNotFoundError``, ``PermissionError``, ...)."""

from __future__ import annotations

from megl_ray.errors import UserError


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
