"""Tune callbacks of ``python -m megl_ray.tune`` (a module of their own: importing Ray Tune takes a second)."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import yaml
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler

from megl_ray import storage

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


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA (one bracket) whose rungs — the metric each trial had at each milestone — are kept in ``state_uri``
    (local or ``s3://``) after every decision and read back when a restored sweep adds its first trial. Tune does
    not save its scheduler with the experiment: without this, a resumed sweep would compare its next trials with
    nobody and stop none of them until new ones reached each rung.

    The file must not end in ``.json`` or ``.pkl``: Tune copies those from the experiment directory when it
    restores one and writes its copies back when it ends, which would put back the state it started from."""

    def __init__(self, state_uri: str, **kwargs: Any) -> None:
        super().__init__(brackets=1, stop_last_trials=False, **kwargs)
        self._state_uri = state_uri
        self._state_loaded = False

    def _milestones(self) -> list[float]:
        return [float(m) for m, _ in self._brackets[0]._rungs]

    def _load_state(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True

        if not storage.exists(self._state_uri):
            return
        saved = yaml.safe_load(storage.read_bytes(self._state_uri)) or {}
        if saved.get("milestones") != self._milestones():
            log.warning("ignoring %s: saved for other milestones", self._state_uri)
            return
        for (_, recorded), values in zip(self._brackets[0]._rungs, saved["recorded"]):
            recorded.update(values)
        log.info("ASHA resumes with %d recorded result(s)", sum(len(v) for v in saved["recorded"]))

    def _save_state(self) -> None:
        state = {
            "milestones": self._milestones(),
            "recorded": [{k: float(v) for k, v in recorded.items()} for _, recorded in self._brackets[0]._rungs],
        }
        storage.write_bytes(self._state_uri, yaml.safe_dump(state).encode())

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_state()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_state()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_state()
        if result.get(self._time_attr, 0) >= self._max_t:
            # Its last epoch: the trial ends by itself. A STOP now (ASHA's rule at max_t) would kill the trial's
            # driver inside TorchTrainer.fit, before it writes result.json and closes its MLflow/W&B run (left
            # RUNNING), and would call a completed trial early-stopped.
            return self.CONTINUE
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_state()
        super().on_trial_complete(tune_controller, trial, result)
        self._save_state()
