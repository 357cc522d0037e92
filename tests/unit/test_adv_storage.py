"""Adversarial storage settings: credentials inside an endpoint URL never reach a message, a bad retry setting
or serve flag is one line, and a failed local write leaves no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from megl_ray import storage
from megl_ray.data import convert
from megl_ray.storage import main as storage_main
from tests.support.adversarial import assert_user_error, run, snapshot

SECRET = "hunter2secret"


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """No credentials anywhere (and no instance-metadata lookup), so S3 calls fail at once, offline."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("MEGL_S3_RETRY_SECONDS", "0")


def _source(tmp_path: Path) -> Path:
    from tests.support.adversarial import write_tiny_source

    return write_tiny_source(tmp_path / "src", n=2)


def test_endpoint_user_info_never_printed(no_aws_credentials, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MEGL_S3_ENDPOINT", f"http://admin:{SECRET}@127.0.0.1:9")
    outcome = run("megl_ray.data.convert", convert.main, [_source(tmp_path), "s3://bucket/ds"], capsys)
    assert_user_error(outcome)
    assert SECRET not in outcome.out + outcome.err and "***@127.0.0.1" in outcome.result["error"]


def test_user_info_is_redacted_from_storage_messages():
    options = storage.S3Options(endpoint_url=f"https://me:{SECRET}@s3.example.com:9000")
    assert SECRET not in options.describe() and options.describe() == "https://***@s3.example.com:9000"
    from botocore.exceptions import EndpointConnectionError

    from megl_ray.storage.s3 import _storage_error  # noqa: PLC0415 - where the translation lives

    err = _storage_error(EndpointConnectionError(endpoint_url=options.endpoint_url + "/b/k"), "s3://b/k", options)
    assert SECRET not in str(err) and "***@s3.example.com" in str(err)


@pytest.mark.parametrize("value", ["abc", "nan", "-5", "inf"])
def test_bad_retry_seconds_is_one_line(value, no_aws_credentials, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MEGL_S3_RETRY_SECONDS", value)
    monkeypatch.setenv("MEGL_S3_ENDPOINT", "http://127.0.0.1:9")
    before = snapshot(tmp_path)
    outcome = run("megl_ray.data.convert", convert.main, [_source(tmp_path), "s3://bucket/ds"], capsys)
    assert_user_error(outcome, "MEGL_S3_RETRY_SECONDS")
    assert snapshot(tmp_path).keys() >= before.keys()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--port", "70000"], "not a valid port"),
        (["--port", "60000"], "not a valid port"),  # its gRPC port would be 70000
        (["--port", "-1"], "not a valid port"),
        (["--port", "http"], "--port"),
    ],
)
def test_serve_refuses_bad_ports(flags, fragment, tmp_path, capsys):
    outcome = run("python -m megl_ray.storage", storage_main, ["serve", "--data-dir", tmp_path / "d", *flags], capsys)
    assert_user_error(outcome, fragment)
    assert not (tmp_path / "d").exists()


def test_serve_refuses_a_file_as_data_dir(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    outcome = run("python -m megl_ray.storage", storage_main, ["serve", "--data-dir", tmp_path / "f"], capsys)
    assert_user_error(outcome, "not a folder")
    assert (tmp_path / "f").read_text() == "mine"


def test_failed_local_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(storage.StorageError, match="directory"):
        storage.write_bytes(str(tmp_path / "out"), b"{}")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "x.json").mkdir()  # os.replace onto a directory fails after the temporary file is written
    with pytest.raises(storage.StorageError):
        storage.write_bytes(str(tmp_path / "ro" / "x.json"), b"{}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "ro", "x.json"]
