"""How S3 credentials reach the training workers and Tune trials without being stored anywhere.

Nothing secret goes into what Ray pickles or persists (a trainable's parameters, a Train loop config, Tune's
experiment state) nor into a runtime environment (Ray logs those). Workers and trials read credentials from their
own environment: a local Ray inherits the driver's, a cluster provides its own (instance roles, secrets mounted by
the operator). For a cluster on this machine that did not inherit them (``ray start`` then ``ray job submit``), the
driver leaves them in a 0600 file under ``$MEGL_HOME`` (outside the run storage) for the run's duration; the loop
config carries only its path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

import ray
from ray.tune.execution import class_cache

from megl_ray.config import megl_home

CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MEGL_S3_SECRET_KEY")
FORWARDED_PREFIXES = ("AWS_", "MEGL_", "MLFLOW_", "WANDB_", "HF_")
"""Forwarded to the workers: S3, megl, tracking and Hugging Face settings (``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``: where a worker resolves a hub id) — their credentials (``HF_TOKEN``) by file only."""
SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "API_KEY", "ACCESS_KEY")
"""A forwarded variable whose name holds one of these is a credential too (``WANDB_API_KEY``,
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN`` …)."""


INHERIT_VAR = "MEGL_RAY_INHERITS_ENV"
"""Set by ``megl_ray.train`` in the environment of a local Ray it starts, whose every process then inherits it."""


def workers_inherit_env() -> bool:
    """Whether the Ray processes this one talks to inherit its environment (and with it the credentials): inside
    or in front of a local Ray that ``megl_ray.train`` starts. Then the S3 filesystems that Ray pickles and stores
    go without explicit keys. On a cluster joined (``--address``, ``$RAY_ADDRESS``, ``ray job submit``), they keep
    them: its processes only have what the cluster provides plus, on this machine, the credentials file, which Ray
    reads before any of our code runs."""
    if os.environ.get(INHERIT_VAR) == "1":
        return True
    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def is_credential(name: str) -> bool:
    return name in CREDENTIAL_VARS or (name.startswith(FORWARDED_PREFIXES) and any(m in name for m in SECRET_MARKERS))


def public_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The S3/tracking/megl settings worth forwarding (endpoint, region, retry budget …), credentials left out."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_PREFIXES) and not is_credential(k)}


OUTER_FILE_VAR = "MEGL_CREDENTIALS_FILE"
"""The path (never the contents) of a credentials file an outer process owns, set where that file was loaded: a
sweep's trial runs a whole training run whose workers need the same credentials, and reuses the sweep's file rather
than writing one of its own, which a trial stopped by the scheduler (its process ended at once) could not remove."""


@contextlib.contextmanager
def credentials_file() -> Iterator[str | None]:
    """A 0600 JSON file of this process's credential variables, removed at the end; None when there are none. Inside
    a process that loaded an outer owner's file (``OUTER_FILE_VAR``), that file, left to its owner."""
    outer = os.environ.get(OUTER_FILE_VAR)
    if outer and Path(outer).is_file():
        yield outer
        return
    values = {k: v for k, v in os.environ.items() if is_credential(k)}
    if not values:
        yield None
        return

    directory = megl_home() / "credentials"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{secrets.token_hex(8)}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as stream:
            json.dump(values, stream)
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def load_credentials(path: str | None) -> None:
    """In a worker or trial: fill in the credential variables its environment lacks from ``path`` (when this
    machine has it: on other nodes the cluster's own environment provides them)."""
    if not path or not Path(path).is_file():
        return
    for key, value in json.loads(Path(path).read_text()).items():
        os.environ.setdefault(key, value)
    os.environ[OUTER_FILE_VAR] = path  # what this process starts reuses it (see ``credentials_file``)


def keep_tune_from_logging_credentials() -> None:
    """Ray Tune copies the driver's ``AWS_*`` credential variables into every trial actor's runtime environment,
    which Ray's ``runtime_env_agent.log`` records in plain text. Under a local Ray the trial processes inherit them
    anyway (and the credentials file covers the rest), so they are dropped from that list."""
    if not workers_inherit_env():
        return

    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in class_cache.ENV_VARS_TO_PROPAGATE if not is_credential(v)}
