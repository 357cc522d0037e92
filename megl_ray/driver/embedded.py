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
from collections.abc import Iterator

from megl_ray import storage
from megl_ray.config import MEGLConfig, megl_home
from megl_ray.data.conversion import ConvertOptions, convert
from megl_ray.data.sample import sample_dataset_path
from megl_ray.data.schema import DATASET_INFO_FILE
from megl_ray.storage.embedded_home import BUCKET, embedded_store_for, serving
from megl_ray.storage.shared_store import locked

log = logging.getLogger(__name__)


def bundled_dataset_s3_uri() -> str:
    digest = hashlib.sha256((sample_dataset_path() / "exp_annotation.json").read_bytes()).hexdigest()[:12]
    return f"s3://{BUCKET}/datasets/digits-{digest}"


def ensure_bundled_dataset(uri: str) -> None:
    """Convert and upload the bundled sample dataset to ``uri`` unless a complete conversion is there. Under a lock:
    two runs started together on a fresh ``$MEGL_HOME`` would otherwise both upload, one overwriting what the other
    reads."""
    with locked(megl_home() / "embedded_s3", "bundled.lock"):
        storage.ensure_bucket(uri)
        if storage.exists(f"{uri}/{DATASET_INFO_FILE}"):
            return
        log.info("uploading the bundled sample dataset to %s", uri)
        convert(ConvertOptions(str(sample_dataset_path()), uri, overwrite=True))


@contextlib.contextmanager
def embedded_default(cfg: MEGLConfig) -> Iterator[MEGLConfig]:
    """Yield ``cfg`` with ``data.uri`` / ``run.storage_path`` filled in, an embedded S3 server running if needed."""
    if cfg.data.uri is not None and cfg.run.storage_path is not None:
        with embedded_store_for(cfg.data.uri, cfg.run.storage_path):
            yield cfg
        return
    with serving(megl_home() / "embedded_s3") as server:  # the driver and the local Ray's workers talk to it
        data_uri = cfg.data.uri or bundled_dataset_s3_uri()
        if cfg.data.uri is None:
            ensure_bundled_dataset(data_uri)
        storage_path = cfg.run.storage_path or f"s3://{BUCKET}/runs"
        if cfg.run.storage_path is None:
            storage.ensure_bucket(storage_path)
        log.info("embedded S3 at %s: data %s, runs %s", server.endpoint_url, data_uri, storage_path)
        yield dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, uri=data_uri),
            run=dataclasses.replace(cfg.run, storage_path=storage_path),
        )
