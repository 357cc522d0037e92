"""The embedded default: what ``python -m megl_ray.train`` uses when no storage or data is given.

An embedded SeaweedFS S3 server on 127.0.0.1 (data kept under ``$MEGL_HOME``, default ``~/.cache/megl_ray``, so a
re-run with the same run name resumes), the bundled sample dataset converted and uploaded to it if absent, and run
storage on it. The same code paths as a real cluster with a real S3 service, on one laptop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from megl_ray.config import MEGLConfig

log = logging.getLogger(__name__)
BUCKET = "megl"


def megl_home() -> Path:
    return Path(os.environ.get("MEGL_HOME", Path.home() / ".cache" / "megl_ray"))


def bundled_dataset_s3_uri() -> str:
    from megl_ray.data.sample import sample_dataset_path

    digest = hashlib.sha256((sample_dataset_path() / "exp_annotation.json").read_bytes()).hexdigest()[:12]
    return f"s3://{BUCKET}/datasets/digits-{digest}"


def ensure_bundled_dataset(uri: str) -> None:
    """Convert and upload the bundled sample dataset to ``uri`` unless a complete conversion is there."""
    from megl_ray import storage
    from megl_ray.data import convert
    from megl_ray.data.sample import sample_dataset_path
    from megl_ray.data.schema import DATASET_INFO_FILE

    storage.ensure_bucket(uri)
    if storage.exists(f"{uri}/{DATASET_INFO_FILE}"):
        return
    log.info("uploading the bundled sample dataset to %s", uri)
    convert.main([str(sample_dataset_path()), uri, "--overwrite"])


ENDPOINT_VARS = ("MEGL_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def points_into_embedded(*uris: str | None) -> bool:
    """Whether a URI is in the embedded default's bucket while no S3 endpoint is configured: then it means the
    embedded store of ``$MEGL_HOME``, which outlives the run that started it."""
    return (any(u and u.startswith(f"s3://{BUCKET}/") for u in uris)
            and not any(os.environ.get(v) for v in ENDPOINT_VARS))


@contextlib.contextmanager
def _serving(data_dir: Path) -> Iterator[Any]:
    """The embedded server on ``data_dir`` (secret from ``$MEGL_S3_SECRET_KEY``), its settings in os.environ for
    this process and the local Ray it starts, both restored at the end."""
    from megl_ray.storage import EMBEDDED_SECRET_ENV, EMBEDDED_SECRET_KEY_DEFAULT, EmbeddedS3

    secret = os.environ.get(EMBEDDED_SECRET_ENV) or EMBEDDED_SECRET_KEY_DEFAULT
    with EmbeddedS3(data_dir, secret_key=secret) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def embedded_store_for(*uris: str | None) -> Iterator[None]:
    """Serve the embedded store for the duration when one of ``uris`` points into it (``points_into_embedded``)
    and it exists: what ``evaluate``, ``explain`` and ``tune`` use after the default run has ended."""
    data_dir = megl_home() / "embedded_s3"
    if not points_into_embedded(*uris) or not data_dir.is_dir():
        yield
        return
    with _serving(data_dir) as server:
        log.info("serving the embedded store of %s at %s", data_dir, server.endpoint_url)
        yield


@contextlib.contextmanager
def embedded_default(cfg: MEGLConfig) -> Iterator[MEGLConfig]:
    """Yield ``cfg`` with ``data.uri`` / ``run.storage_path`` filled in, an embedded S3 server running if needed."""
    if cfg.data.uri is not None and cfg.run.storage_path is not None:
        with embedded_store_for(cfg.data.uri, cfg.run.storage_path):
            yield cfg
        return
    with _serving(megl_home() / "embedded_s3") as server:  # the driver and the local Ray's workers talk to it
        data_uri = cfg.data.uri or bundled_dataset_s3_uri()
        if cfg.data.uri is None:
            ensure_bundled_dataset(data_uri)
        storage_path = cfg.run.storage_path or f"s3://{BUCKET}/runs"
        if cfg.run.storage_path is None:
            from megl_ray import storage

            storage.ensure_bucket(storage_path)
        log.info("embedded S3 at %s: data %s, runs %s", server.endpoint_url, data_uri, storage_path)
        yield dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, uri=data_uri),
                                  run=dataclasses.replace(cfg.run, storage_path=storage_path))
