"""megl_ray.storage.s3: options from the environment, clients, error translation, credentials never leaking."""

from __future__ import annotations

import logging

import pytest

from megl_ray import storage
from megl_ray.storage import AccessDeniedError, S3Options
from tests.support.storage_support import LEAK_ACCESS, LEAK_SECRET, LEAK_TOKEN


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
def test_credentials_never_leak(embedded_s3, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = S3Options(
        endpoint_url=embedded_s3.endpoint_url, access_key=LEAK_ACCESS, secret_key=LEAK_SECRET, session_token=LEAK_TOKEN
    )
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
    half_right = S3Options(
        endpoint_url=embedded_s3.endpoint_url, access_key=embedded_s3.access_key, secret_key=LEAK_SECRET
    )
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
        embedded_s3.access_key,
        embedded_s3.options.secret_key,
        None,
    )
    storage.ensure_bucket("s3://t-env")
    storage.write_bytes("s3://t-env/k", b"via env")
    assert storage.read_bytes("s3://t-env/k") == b"via env"
