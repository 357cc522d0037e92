"""Shared fixtures. Tests run on 2 CPU cores: keep torch to the cores we have and deterministic."""

import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402 - appended section


@pytest.fixture(scope="session")
def embedded_s3(tmp_path_factory):
    """One embedded SeaweedFS S3 server for the whole session; tests pass ``embedded_s3.options`` explicitly
    (nothing is put in os.environ). Mark tests using it ``@pytest.mark.slow``; use a bucket of your own."""
    from megl_ray.storage import EmbeddedS3

    server = EmbeddedS3(tmp_path_factory.mktemp("embedded_s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
