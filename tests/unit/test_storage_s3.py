"""megl_ray.storage.s3: options from the environment, clients, error translation, credentials never leaking."""

from __future__ import annotations

import time

import pytest

from megl_ray import storage
from megl_ray.storage import S3Options, StorageError, UnreachableError
from tests.support.storage_support import LEAK_ACCESS, LEAK_SECRET, LEAK_TOKEN, free_port


def test_options_repr_hides_credentials():
    options = S3Options(
        endpoint_url="http://127.0.0.1:1", access_key=LEAK_ACCESS, secret_key=LEAK_SECRET, session_token=LEAK_TOKEN
    )
    for text in (repr(options), str(options), options.describe()):
        assert LEAK_ACCESS not in text and LEAK_SECRET not in text and LEAK_TOKEN not in text
    assert "127.0.0.1:1" in repr(options)


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


def test_unreachable_endpoint_is_a_clear_error_not_a_hang():
    port = free_port()
    options = S3Options(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key=LEAK_ACCESS,
        secret_key=LEAK_SECRET,
        max_attempts=2,
        retry_seconds=1.0,
    )
    started = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        storage.read_bytes("s3://bucket/key", options)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "s3://bucket/key" in message and f"127.0.0.1:{port}" in message and "\n" not in message
    assert LEAK_SECRET not in message and LEAK_ACCESS not in message
