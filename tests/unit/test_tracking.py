"""megl_ray.reporting.tracking, and what a user of ``python -m megl_ray.train`` sees: one real training run of the
tiny preset (2 workers, 9 steps) tracked at once by TensorBoard, a real ``mlflow server`` on 127.0.0.1 and W&B in
offline mode serves the slow tests — read back through ``MlflowClient`` and W&B's offline run file — together with
its console (line budget) and its pictures (curves.png, a gallery that renders in headless Chromium)."""

from __future__ import annotations

import math

from megl_ray.config import load_config
from megl_ray.reporting import tracking

# ------------------------------------------------------------------------------------------------- no training


def test_backends_and_flat_params():
    assert tracking.backends_of("none") == [] and tracking.backends_of("mlflow") == ["mlflow"]
    assert tracking.backends_of(["wandb", "none", "wandb", "tensorboard"]) == ["wandb", "tensorboard"]
    assert tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": 1, "a.c.d": None, "e": [1]}


def test_a_failing_backend_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    calls = []

    class Flaky:
        def __init__(self, *args):
            pass

        def metrics(self, values, step):
            calls.append(step)
            raise ConnectionError("tracking server at http://127.0.0.1:9 refused the connection")

    class Broken:
        def __init__(self, *args):
            raise RuntimeError("api_key not configured")

    monkeypatch.setitem(tracking.BACKENDS, "mlflow", Flaky)
    monkeypatch.setitem(tracking.BACKENDS, "wandb", Broken)
    cfg = load_config(None, ["run.tracking=[mlflow,wandb]"])
    tracker = tracking.Tracker(cfg, str(tmp_path / "run"), tmp_path)
    assert list(tracker.backends) == ["mlflow"]
    tracker.metrics({"train/loss": 1.0, "train/nan": math.nan}, 3)
    tracker.metrics({"train/loss": 0.5}, 6)  # the backend is off after its first failure
    tracker.close(success=True)
    assert calls == [3]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "wandb is off" in warnings[0] and "mlflow failed" in warnings[1]


# ------------------------------------------------------------------------------------------- one tracked run
