"""The embedded store of ``$MEGL_HOME``: an embedded SeaweedFS S3 server on its data directory, serving
``s3://megl/...`` to this process (and the local Ray it starts) while no other S3 endpoint is configured. The
default run (``megl_ray.driver.embedded``), ``evaluate``, ``explain``, ``export`` and ``tune`` use it: one server
shared by all of them while any runs (``megl_ray.storage.shared_store``), so two runs and an evaluation can use one
``$MEGL_HOME`` side by side."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megl_ray.config import megl_home
from megl_ray.storage.embedded import EMBEDDED_SECRET_ENV, EMBEDDED_SECRET_KEY_DEFAULT
from megl_ray.storage.shared_store import shared_store

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
    """The embedded store on ``data_dir``, shared with every other local process using it (``shared_store``;
    secret from ``$MEGL_S3_SECRET_KEY``), its settings in os.environ for this process and the local Ray it starts,
    both restored at the end."""
    secret = os.environ.get(EMBEDDED_SECRET_ENV) or EMBEDDED_SECRET_KEY_DEFAULT
    with shared_store(data_dir, secret) as store:
        saved = {k: os.environ.get(k) for k in store.env()}
        os.environ.update(store.env())
        try:
            yield store
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
    with serving(data_dir):
        yield
