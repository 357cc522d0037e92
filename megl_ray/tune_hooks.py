"""Tune callbacks of ``python -m megl_ray.tune`` (a module of their own: importing Ray Tune takes a second)."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from ray.tune import Callback

log = logging.getLogger("megl_ray.tune")
INTERRUPT_HOOK = "MEGL_TEST_TUNE_INTERRUPT_AFTER"


class InterruptAfter(Callback):
    """Test hook: send this process SIGINT (Tune then stops and saves the experiment, as on Ctrl-C) once
    ``$MEGL_TEST_TUNE_INTERRUPT_AFTER`` trials have completed in this process. The variable is read when a trial
    completes, so a resumed sweep (which restores this callback with the rest of its settings) runs to the end
    once the variable is unset."""

    def __init__(self) -> None:
        self.completed = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed += 1
        after = int(os.environ.get(INTERRUPT_HOOK, "0") or 0)
        if after and self.completed == after:
            log.warning("test hook: interrupting the sweep after %d finished trial(s)", after)
            os.kill(os.getpid(), signal.SIGINT)
