"""What an interrupted or failed run says last: the run, the step of its last checkpoint, and the exact command that
resumes it (the same configuration under the same ``run.name``: see ``run_identity``).

SIGINT (Ctrl-C) exits 130, SIGTERM 143, both through ``megl_ray.errors.Interrupted``; a run that Ray Train gave up
on (a worker killed by the OOM killer, nodes lost beyond ``train.max_failures``) ends with one line naming the cause
and the same resume command."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence

from megl_ray import storage
from megl_ray.errors import Interrupted

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints it registered (``ray.train.v2._internal.constants``): what a resume starts
from. A checkpoint a worker wrote but the controller had not taken yet (it polls every 2 s) is not in it."""


def resume_command(config: str | None, overrides: Sequence[str], name: str, named: bool) -> str:
    """The command line that resumes run ``name``: the same config and overrides, ``run.name`` added when the run
    had a fresh name."""
    parts = ["python", "-m", "megl_ray.train"]
    if config:
        parts += ["--config", config]
    parts += list(overrides)
    if not named:
        parts.append(f"run.name={name}")
    return shlex.join(parts)


def last_checkpoint_step(run_uri: str) -> int | None:
    """The optimizer step of the latest checkpoint Ray Train registered for the run, the one a resume starts from
    (None: none yet, or unreadable)."""
    with contextlib.suppress(Exception):  # a message about an interruption must not fail itself
        snapshot = json.loads(storage.read_bytes(f"{run_uri}/{SNAPSHOT_FILE}"))
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    return None


def interrupted_lines(name: str, run_uri: str, signal_name: str, command: str) -> tuple[str, ...]:
    step = last_checkpoint_step(run_uri)
    where = (
        f"its last checkpoint is at step {step}"
        if step is not None
        else "it had no checkpoint yet (a resume starts from the beginning)"
    )
    return (
        f"[megl] run {name} interrupted ({signal_name}); {where} ({run_uri})",
        f"[megl] resume it with: {command}",
    )


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``Interrupted(143)`` in the main thread for the duration (Ctrl-C raises KeyboardInterrupt):
    a run stopped by a scheduler or ``kill`` unwinds like Ctrl-C — workers stopped, local Ray and store shut down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise Interrupted(143, ("SIGTERM",))

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
