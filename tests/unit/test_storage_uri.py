"""megl_ray.storage.uri: s3:// URIs and their validation."""

from __future__ import annotations

import pytest

from megl_ray import storage
from megl_ray.errors import UserError
from megl_ray.storage import InvalidURIError


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
