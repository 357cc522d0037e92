"""A run name identifies one configuration: what a re-run with the same name does.

``run.json`` beside the run's checkpoints holds the configuration it was started with. A re-run resumes when its
fingerprint — the resolved config minus the keys that may change on resume (``RESUMABLE_KEYS``) — is the same,
reports the finished result when the run is complete, and stops with the differing keys otherwise (resuming under
another configuration would mix the old checkpoint and schedule with the new settings).
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from megl_ray import storage
from megl_ray.config import MEGLConfig
from megl_ray.errors import UserError
from megl_ray.reporting.tracking import flatten

log = logging.getLogger("megl_ray.train")
IDENTITY_FILE = "run.json"
RESULT_FILE = "result.json"
RESUMABLE_KEYS = frozenset(
    {
        "train.max_failures",
        "train.checkpoint_every",
        "train.sample_log_dir",
        "train.cache_data",
        "train.cpus_per_worker",
        "train.max_nonfinite_steps",
        "run.log_every",
        "run.name",
        "run.storage_path",
    }
)
"""Keys that do not change what is trained: how often to log/checkpoint, how to recover, where the run lives."""


def fingerprint(cfg: MEGLConfig) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` pairs, without ``RESUMABLE_KEYS``."""
    return {k: v for k, v in sorted(flatten(cfg.to_dict()).items()) if k not in RESUMABLE_KEYS}


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if json.dumps(saved.get(k), sort_keys=True) != json.dumps(current.get(k), sort_keys=True)]


def run_state(cfg: MEGLConfig, run_uri: str) -> str:
    """What ``check_run`` would do, read-only: ``new``, ``resume``, ``complete``, or ``conflict: <keys> differ``."""
    identity_uri = f"{run_uri}/{IDENTITY_FILE}"
    if not storage.exists(identity_uri):
        return "new"
    changed = differing_keys(json.loads(storage.read_bytes(identity_uri))["fingerprint"], fingerprint(cfg))
    if changed:
        return f"conflict: {', '.join(changed)} differ"
    return "complete" if storage.exists(f"{run_uri}/{RESULT_FILE}") else "resume"


def check_run(cfg: MEGLConfig, run_uri: str) -> dict[str, Any] | None:
    """Before training: the finished result when this run is complete (None: train or resume it). Raises a
    ``UserError`` naming the keys when the run exists with another configuration; records the identity of a new
    run."""
    identity_uri, current = f"{run_uri}/{IDENTITY_FILE}", fingerprint(cfg)
    if storage.exists(identity_uri):
        saved = json.loads(storage.read_bytes(identity_uri))["fingerprint"]
        changed = differing_keys(saved, current)
        if changed:
            raise UserError(
                f"run {cfg.run.name} exists with another configuration ({', '.join(changed)} differ"
                f"{'s' if len(changed) == 1 else ''}): re-run with its settings to resume it, or start a "
                f"new run with run.name=<new name>"
            )
        if storage.exists(f"{run_uri}/{RESULT_FILE}"):
            print(f"run {cfg.run.name} is complete: {run_uri}", file=sys.stderr, flush=True)
            return json.loads(storage.read_bytes(f"{run_uri}/{RESULT_FILE}"))
        log.info("resuming run %s (same configuration)", cfg.run.name)
        return None
    storage.write_bytes(
        identity_uri,
        (json.dumps({"name": cfg.run.name, "fingerprint": current}, indent=2, sort_keys=True) + "\n").encode(),
    )
    return None


def name_given(config_path: str | None, overrides: Sequence[str]) -> bool:
    """Whether ``run.name`` was chosen (an override, or the YAML file's ``run: name:``)."""
    if any(o.split("=", 1)[0].strip() == "run.name" for o in overrides):
        return True
    if config_path:
        try:
            tree = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return False  # load_config reports it
        run = tree.get("run") if isinstance(tree, dict) else None
        return isinstance(run, dict) and "name" in run
    return False


def fresh_name(base: str) -> str:
    """A new run name per invocation: ``<base>-<UTC time>-<4 hex>``."""
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
