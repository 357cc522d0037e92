"""The embedded store of ``$MEGL_HOME``: an embedded SeaweedFS S3 server on its data directory, serving
``s3://megl/...`` to this process (and the local Ray it starts) while no other S3 endpoint is configured. The
default run (``megl_ray.driver.embedded``) starts it; ``evaluate``, ``explain`` and ``tune`` serve it again after
that run has ended."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megl_ray.config import megl_home
from megl_ray.storage.embedded import EMBEDDED_SECRET_ENV, EMBEDDED_SECRET_KEY_DEFAULT, EmbeddedS3

log = logging.getLogger(__name__)
BUCKET = "megl"
"""The embedded default's bucket: datasets under ``datasets/``, runs under ``runs/``."""
ENDPOINT_VARS = ("MEGL_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def points_into_embedded(*uris: str | None) -> bool:
    """Whether a URI is in the embedded default's bucket while no S3 endpoint is configured: then it means the
    embedded store of ``$MEGL_HOME``, which outlives the run that started it."""
    return any(u and u.startswith(f"s3://{BUCKET}/") for u in uris) and not any(
        os.environ.get(v) for v in ENDPOINT_VARS
    )


@contextlib.contextmanager
def serving(data_dir: Path) -> Iterator[Any]:
    """The embedded server on ``data_dir`` (secret from ``$MEGL_S3_SECRET_KEY``), its settings in os.environ for
    this process and the local Ray it starts, both restored at the end."""
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
    with serving(data_dir) as server:
        log.info("serving the embedded store of %s at %s", data_dir, server.endpoint_url)
        yield
